"""A hand-set AutoencoderKL for runs without pretrained weights (the demo): the encoder averages
each f x f pixel block (f = 2^(levels-1)) into latent channels 0-2 (R, G, B), the decoder repeats
every latent over its block. A random frozen VAE cannot decode colours, so a model trained on
its latents could never be checked by colour; this one reconstructs block means exactly.

How the layers become that map (every other weight is zero, every norm scale 1):
- conv_in writes each colour c as the pair (s*c, -s*c); resnets and mid attention add zero, so
  they pass their input on (a width change goes through the 1x1 shortcut, set to identity);
- downsamplers average 2x2 blocks; upsamplers keep the nearest-neighbour copy (centre tap);
- the GroupNorm before conv_out sees each pair in one group, so its mean is exactly 0, and with
  s tiny its variance is far below eps: it multiplies by 1/sqrt(eps) up to ~1e-5;
- conv_out reads silu(y) - silu(-y) = y from each pair: exactly linear.
The posterior log-variance is -30 (the clip), so samples equal the mean to ~3e-7.
"""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from catflax.models.rngs import abstract_module
from catflax.models.vae import _EPS, AutoencoderKL, VAEConfig

COLOUR_CHANNELS = 3
SIGNAL_SCALE = 1e-6  # s: keeps every GroupNorm variance ~1e-12, far below its eps (1e-6)
LOGVAR = -30.0  # the posterior's clip: std 3e-7
PIXEL_STD = 0.5  # typical std of [-1, 1] block means; sets the latent gain (see `latent_gain`)


def latent_gain(cfg: VAEConfig, pixel_std: float = PIXEL_STD) -> float:
    """Latents = gain x block means, so that scaling_factor x latents has a std near 1."""
    return 1.0 / (cfg.scaling_factor * pixel_std)


def _check(cfg: VAEConfig) -> None:
    channels = (*cfg.block_out_channels, cfg.latent_channels)
    if cfg.in_channels != COLOUR_CHANNELS or cfg.out_channels != COLOUR_CHANNELS:
        raise ValueError(f"pooling VAE: in/out_channels must be 3, got {cfg}")
    if cfg.latent_channels < COLOUR_CHANNELS or min(cfg.block_out_channels) < 2 * COLOUR_CHANNELS:
        raise ValueError(
            f"pooling VAE: needs latent_channels >= 3 and every block width >= 6, got {channels}"
        )
    odd = [c for c in cfg.block_out_channels if (c // cfg.norm_num_groups) % 2]
    if odd:
        raise ValueError(
            f"pooling VAE: block widths {odd} / norm_num_groups {cfg.norm_num_groups} must be "
            "even (each +/- pair in one GroupNorm group)"
        )


def _pairs_in(kernel: np.ndarray, gain: float) -> None:
    """Centre tap: input channel c -> output channels (2c, 2c+1) as (gain*c, -gain*c)."""
    centre = kernel.shape[0] // 2
    for c in range(COLOUR_CHANNELS):
        kernel[centre, centre, c, 2 * c] = gain
        kernel[centre, centre, c, 2 * c + 1] = -gain


def _pairs_out(kernel: np.ndarray, gain: float) -> None:
    """Centre tap: output channel c = gain * (input 2c - input 2c+1)."""
    centre = kernel.shape[0] // 2
    for c in range(COLOUR_CHANNELS):
        kernel[centre, centre, 2 * c, c] = gain
        kernel[centre, centre, 2 * c + 1, c] = -gain


def _identity(kernel: np.ndarray) -> None:
    """Centre tap: channel c -> channel c, for c < min(in, out)."""
    centre = kernel.shape[0] // 2
    n = min(kernel.shape[2], kernel.shape[3])
    kernel[centre, centre, np.arange(n), np.arange(n)] = 1.0


def pooling_vae_arrays(cfg: VAEConfig) -> dict[tuple, np.ndarray]:
    """Every parameter of `AutoencoderKL(cfg)` by its nnx path, as float32 numpy arrays."""
    _check(cfg)
    abstract = abstract_module(lambda rngs: AutoencoderKL(cfg, rngs=rngs))
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        fill = 1.0 if path[-1] == "scale" else 0.0  # norms: weight 1, bias 0
        arrays[tuple(path)] = np.full(var.get_value().shape, fill, np.float32)
    s, gain = SIGNAL_SCALE, latent_gain(cfg)
    norm_gain = math.sqrt(_EPS) / s  # undoes GroupNorm's 1/sqrt(var + eps) ~ 1/sqrt(eps)
    lat = cfg.latent_channels
    for path, kernel in arrays.items():
        name = ".".join(str(p) for p in path)
        if not name.endswith("kernel"):
            continue
        if "downsamplers" in name:  # stride 2, padding (0, 1): taps 0 and 1 are the 2x2 block
            c = np.arange(kernel.shape[2])
            kernel[:2, :2, c, c] = 0.25
        elif "upsamplers" in name or "conv_shortcut" in name or "quant_conv" in name:
            _identity(kernel)
    _pairs_in(arrays[("encoder", "conv_in", "kernel")], s)
    _pairs_out(arrays[("encoder", "conv_out", "kernel")], gain * norm_gain)
    arrays[("encoder", "conv_out", "bias")][lat:] = LOGVAR
    _pairs_in(arrays[("decoder", "conv_in", "kernel")], s / gain)
    _pairs_out(arrays[("decoder", "conv_out", "kernel")], norm_gain)
    return arrays


def pooling_vae(cfg: VAEConfig) -> AutoencoderKL:
    """The hand-set autoencoder as a model (for tests and tools; training uses the arrays)."""
    model = abstract_module(lambda rngs: AutoencoderKL(cfg, rngs=rngs))
    state = nnx.state(model, nnx.Param)
    arrays = pooling_vae_arrays(cfg)
    for path, var in nnx.to_flat_state(state):
        var.set_value(arrays[tuple(path)])
    nnx.update(model, state)
    return model
