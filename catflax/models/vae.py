"""The SD-1.5 AutoencoderKL (f=8, 4 latent channels), matching diffusers' `AutoencoderKL`.

Module names mirror diffusers (`encoder.down_blocks.0.resnets.0.conv1`, `quant_conv`, ...).
Images are NHWC in [-1, 1]; latents are NHWC. Diffusion works on `LATENT_SCALE` x latents.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from catflax.models.attention import dot_product_attention
from catflax.models.layers import (
    call_maybe_remat,
    dtypes_of,
    group_norm,
    remat_mode,
    torch_conv,
    torch_linear,
)
from catflax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from catflax.models.rngs import abstract_module

# SD-1.x latent scale: the UNet sees LATENT_SCALE * (VAE latents); decoding divides it back out.
LATENT_SCALE = 0.18215
_EPS = 1e-6  # every norm of diffusers' VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of the autoencoder; defaults are SD-1.5's (`vae/config.json`)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level per entry: f=2^(n-1)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = LATENT_SCALE
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "xla"  # xla | cudnn | chunked | splash (TPU); mid attention over (H/f)*(W/f)
    remat: bool = False  # recompute res blocks in the backward pass
    remat_policy: str = "full"  # with remat: "full" | "dots" (layers.REMAT_POLICIES)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}"
            )

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side: each level after the first halves it (SD-1.5's: 8)."""
        return 2 ** (len(self.block_out_channels) - 1)


SD15_VAE = VAEConfig()


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior over latents (B,h,w,C); logvar clipped to [-30, 20] as diffusers.
    A tuple, so `mean, logvar = vae.encode(x)` works."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean


class VAEAttention(nnx.Module):
    """Single-head self-attention over the H*W positions: GroupNorm, q/k/v, out, plus the input."""

    def __init__(self, ch: int, groups: int, implementation: str, *, rngs: nnx.Rngs, **dt):
        self.implementation = implementation
        self.group_norm = group_norm(ch, groups, _EPS, rngs=rngs, **dt)
        self.to_q = torch_linear(ch, ch, rngs=rngs, **dt)
        self.to_k = torch_linear(ch, ch, rngs=rngs, **dt)
        self.to_v = torch_linear(ch, ch, rngs=rngs, **dt)
        self.to_out = nnx.List([torch_linear(ch, ch, rngs=rngs, **dt)])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        h_BL1C = self.group_norm(x_BHWC).reshape(B, H * W, 1, C)
        out = dot_product_attention(
            self.to_q(h_BL1C), self.to_k(h_BL1C), self.to_v(h_BL1C),
            implementation=self.implementation,
        )  # fmt: skip
        return x_BHWC + self.to_out[0](out.reshape(B, H, W, C))


def _resnet(in_ch: int, out_ch: int, cfg: VAEConfig, rngs: nnx.Rngs) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_ch, out_ch, None, cfg.norm_num_groups, _EPS, rngs=rngs, **dtypes_of(cfg)
    )


class MidBlock(nnx.Module):
    """resnet, attention (optional), resnet."""

    def __init__(self, ch: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.remat, dt = remat_mode(cfg), dtypes_of(cfg)
        self.resnets = nnx.List([_resnet(ch, ch, cfg, rngs), _resnet(ch, ch, cfg, rngs)])
        self.attentions = (
            nnx.List([VAEAttention(ch, cfg.norm_num_groups, cfg.attention, rngs=rngs, **dt)])
            if cfg.mid_block_add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = call_maybe_remat(self.remat, self.resnets[0], x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return call_maybe_remat(self.remat, self.resnets[1], x)


class EncoderBlock(nnx.Module):
    """diffusers' DownEncoderBlock2D: resnets, then a stride-2 conv with (0,1) padding."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, cfg: VAEConfig, *, rngs):
        self.remat = remat_mode(cfg)
        n = cfg.layers_per_block
        self.resnets = nnx.List(
            [_resnet(in_ch if j == 0 else out_ch, out_ch, cfg, rngs) for j in range(n)]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_ch, ((0, 1), (0, 1)), rngs=rngs, **dtypes_of(cfg))])
            if downsample else None
        )  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = call_maybe_remat(self.remat, resnet, x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nnx.Module):
    """diffusers' UpDecoderBlock2D: layers_per_block + 1 resnets, then nearest 2x and a conv."""

    def __init__(self, in_ch: int, out_ch: int, upsample: bool, cfg: VAEConfig, *, rngs):
        self.remat = remat_mode(cfg)
        self.resnets = nnx.List([
            _resnet(in_ch if j == 0 else out_ch, out_ch, cfg, rngs)
            for j in range(cfg.layers_per_block + 1)
        ])  # fmt: skip
        self.upsamplers = (
            nnx.List([Upsample2D(out_ch, rngs=rngs, **dtypes_of(cfg))]) if upsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = call_maybe_remat(self.remat, resnet, x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt, ch, n = dtypes_of(cfg), cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = torch_conv(cfg.in_channels, ch[0], 3, rngs=rngs, **dt)
        self.down_blocks = nnx.List(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], i < n - 1, cfg, rngs=rngs) for i in range(n)]
        )
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups, _EPS, rngs=rngs, **dt)
        self.conv_out = torch_conv(ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs, **dt)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv_in(x_BHWC)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt, up, n = dtypes_of(cfg), cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = torch_conv(cfg.latent_channels, up[0], 3, rngs=rngs, **dt)
        self.mid_block = MidBlock(up[0], cfg, rngs=rngs)
        self.up_blocks = nnx.List(
            [DecoderBlock(up[max(i - 1, 0)], up[i], i < n - 1, cfg, rngs=rngs) for i in range(n)]
        )
        self.conv_norm_out = group_norm(up[-1], cfg.norm_num_groups, _EPS, rngs=rngs, **dt)
        self.conv_out = torch_conv(up[-1], cfg.out_channels, 3, rngs=rngs, **dt)

    def __call__(self, z_BhwC: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z_BhwC))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """images (B,H,W,3) in [-1,1] <-> latents (B,H/f,W/f,latent_channels)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt, lat = dtypes_of(cfg), cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        conv1x1 = lambda c: torch_conv(c, c, 1, rngs=rngs, **dt)  # noqa: E731
        self.quant_conv = conv1x1(2 * lat) if cfg.use_quant_conv else None
        self.post_quant_conv = conv1x1(lat) if cfg.use_post_quant_conv else None

    def encode(self, images_BHWC: jax.Array) -> DiagonalGaussian:
        """The posterior over (unscaled) latents."""
        moments = self.encoder(images_BHWC.astype(jnp.dtype(self.config.dtype)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents_BhwC: jax.Array) -> jax.Array:
        """Images in about [-1,1] from (unscaled) latents."""
        z = latents_BhwC.astype(jnp.dtype(self.config.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_to_diffusion(self, images_BHWC: jax.Array, key: jax.Array) -> jax.Array:
        """scaling_factor x a posterior sample: the latents the UNet is trained on (SPEC.md §5)."""
        return self.config.scaling_factor * self.encode(images_BHWC).sample(key)

    def decode_from_diffusion(self, latents_BhwC: jax.Array) -> jax.Array:
        """Images from UNet-space latents (divided by scaling_factor first, SPEC.md §6)."""
        return self.decode(latents_BhwC / self.config.scaling_factor)

    def __call__(self, images_BHWC: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode a posterior sample (or the mean when no key is given)."""
        posterior = self.encode(images_BHWC)
        return self.decode(posterior.mean if key is None else posterior.sample(key))

    @classmethod
    def from_state_dict(
        cls, cfg: VAEConfig, state: dict[str, Any], *, source_name: str, rename=None, place=None
    ):
        """The VAE from a PyTorch-style state dict (names via `rename`): (model, LoadReport)."""
        from catflax.weights import convert

        abstract = abstract_module(lambda rngs: cls(cfg, rngs=rngs))
        return convert.load_state_dict(
            abstract, state, source_name=source_name, rename=rename, place=place
        )

    @classmethod
    def from_pretrained(
        cls, path: str, *, config: VAEConfig | None = None, allow_pickle: bool = False,
        place=None, output_loading_info: bool = False, variant: str | None = None, **overrides,
    ):  # fmt: skip
        """Loads a diffusers directory (pipeline root with vae/, or vae/ itself) or an LDM single
        file (`first_stage_model.*`, or a bare VAE file); see `UNet.from_pretrained`."""
        import os

        from catflax.weights import diffusers_format, io, ldm

        if os.path.isdir(path):  # a given `config` must agree with config.json
            fields = {**(dataclasses.asdict(config) if config else {}), **overrides}
            model, report = diffusers_format.load_vae(
                path, allow_pickle=allow_pickle, place=place, variant=variant, **fields
            )
        else:
            io.check_no_variant(path, variant)
            cfg = dataclasses.replace(config or SD15_VAE, **overrides)
            model, report = ldm.load_vae(path, cfg, allow_pickle=allow_pickle, place=place)
        return (model, report) if output_loading_info else model
