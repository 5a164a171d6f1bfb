"""The SD-1.5-inpainting UNet with CAT-Diffusion's reference adapter (SPEC.md §1-2).

The module tree mirrors diffusers' `UNet2DConditionModel` (`down_blocks.0.resnets.0.conv1`,
`...attentions.0.transformer_blocks.0.attn1.to_q`, ...), so its state dicts map one to one; the
adapter adds `ref_norm` and `ref_attn` to every transformer block (`norm4`/`attn3` in the
reference). Images are NHWC: `sample (B,H,W,in_channels)` -> noise prediction `(B,H,W,out)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catflax.models.layers import (
    Attention,
    FeedForward,
    call_maybe_remat,
    dtypes_of,
    group_norm,
    layer_norm,
    remat_mode,
    torch_conv,
    torch_linear,
)
from catflax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from catflax.models.rngs import abstract_module

ADAPTER_MODULES = ("ref_norm", "ref_attn")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Sizes of the UNet; defaults are SD-1.5-inpainting plus the reference adapter."""

    in_channels: int = 9  # 4 noisy latents + 1 mask + 4 masked-image latents
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # down levels; up mirrors
    layers_per_block: int = 2
    num_heads: int = 8
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 768  # CLIP text width
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # False: 1x1-conv proj_in/proj_out (SD 1.x)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    ref_adapter: bool = True  # False: exactly SD-1.5-inpainting
    ref_dim: int = 1024  # width of the semantic tokens (CLIP vision)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "xla"  # xla | cudnn | chunked | splash (TPU)
    remat: bool = False  # recompute res and transformer blocks in the backward pass
    remat_policy: str = "full"  # with remat: "full" | "dots" (layers.REMAT_POLICIES)

    def __post_init__(self):
        for name in ("block_out_channels", "attention_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"attention_levels {self.attention_levels} needs one entry per level of "
                f"block_out_channels {self.block_out_channels}"
            )
        for ch in self.block_out_channels:
            if ch % self.num_heads or ch % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {ch} must be divisible by num_heads {self.num_heads} "
                    f"and norm_num_groups {self.norm_num_groups}"
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def downsampling_factor(self) -> int:
        """Input side / side of the coarsest level: each down level but the last halves it."""
        return 2 ** (len(self.block_out_channels) - 1)


SD15_INPAINTING_UNET = UNetConfig(ref_adapter=False)
CAT_UNET = UNetConfig()


def is_adapter_param(path: str) -> bool:
    """Whether a dotted parameter path (ours or diffusers-style) is in the reference adapter."""
    return any(part in ADAPTER_MODULES for part in path.split("."))


def init_adapter_state(abstract: UNet, rename=None, seed: int = 0) -> dict[str, Any]:
    """Fresh reference-adapter tensors as PyTorch initialises new layers (the reference's
    choice): LayerNorm weight 1, bias 0; Linear weight and bias U(+-1/sqrt(fan_in)).

    Keyed by source name (via `rename`), in PyTorch layout. Drawn on the host with numpy, so
    the other ~860M parameters are never initialised just to be overwritten.
    """
    from catflax.weights import convert

    rng = np.random.default_rng(seed)
    names = convert.torch_names(abstract, rename)
    flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    out = {}
    for path, var in sorted(flat.items(), key=lambda item: convert.path_str(item[0])):
        ours = convert.path_str(path)
        if not is_adapter_param(ours):
            continue
        shape, leaf, owner = var.get_value().shape, path[-1], path[:-1]
        if "ref_norm" in owner:
            value = np.ones(shape) if leaf == "scale" else np.zeros(shape)
        else:  # a Linear of ref_attn: fan_in is its kernel's first (input) axis
            bound = 1.0 / math.sqrt(flat[(*owner, "kernel")].get_value().shape[0])
            value = rng.uniform(-bound, bound, shape)
        src = names[path]
        out[src.key] = np.ascontiguousarray(convert.to_torch(value.astype(np.float32), src.layout))
    return out


def timestep_embedding(
    timesteps_B: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:  # fmt: skip
    """Sinusoidal embedding (B,dim) as diffusers' get_timestep_embedding, in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args_BH = timesteps_B.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args_BH), jnp.cos(args_BH)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, **dt):
        self.linear_1 = torch_linear(in_dim, dim, rngs=rngs, **dt)
        self.linear_2 = torch_linear(dim, dim, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, reference attention (adapter), cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        dt, heads = dtypes_of(cfg), cfg.num_heads
        kw = dict(implementation=cfg.attention, rngs=rngs, **dt)
        self.norm1 = layer_norm(dim, 1e-5, rngs=rngs, **dt)
        self.attn1 = Attention(dim, None, heads, dim // heads, **kw)
        self.ref_norm = layer_norm(dim, 1e-5, rngs=rngs, **dt) if cfg.ref_adapter else None
        self.ref_attn = (
            Attention(dim, cfg.ref_dim, heads, dim // heads, **kw) if cfg.ref_adapter else None
        )
        self.norm2 = layer_norm(dim, 1e-5, rngs=rngs, **dt)
        self.attn2 = Attention(dim, cfg.cross_attention_dim, heads, dim // heads, **kw)
        self.norm3 = layer_norm(dim, 1e-5, rngs=rngs, **dt)
        self.ff = FeedForward(dim, rngs=rngs, **dt)

    def __call__(self, x_BLD: jax.Array, context_BSC: jax.Array, ref_BRE: jax.Array | None):
        x_BLD = x_BLD + self.attn1(self.norm1(x_BLD))
        if self.ref_attn is not None:
            x_BLD = x_BLD + self.ref_attn(self.ref_norm(x_BLD), ref_BRE)
        x_BLD = x_BLD + self.attn2(self.norm2(x_BLD), context_BSC)
        return x_BLD + self.ff(self.norm3(x_BLD))


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, plus the input."""

    def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        dt = dtypes_of(cfg)
        self.linear, self.remat = cfg.use_linear_projection, remat_mode(cfg)
        self.norm = group_norm(ch, cfg.norm_num_groups, 1e-6, rngs=rngs, **dt)
        proj = (lambda: torch_linear(ch, ch, rngs=rngs, **dt)) if self.linear else (
            lambda: torch_conv(ch, ch, 1, rngs=rngs, **dt))  # fmt: skip
        self.proj_in = proj()
        depth = cfg.transformer_layers_per_block
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(ch, cfg, rngs=rngs) for _ in range(depth)]
        )
        self.proj_out = proj()

    def __call__(self, x_BHWC, context_BSC, ref_BRE):
        B, H, W, C = x_BHWC.shape
        h = self.norm(x_BHWC)
        if self.linear:
            h = self.proj_in(h.reshape(B, H * W, C))
        else:
            h = self.proj_in(h).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = call_maybe_remat(self.remat, block, h, context_BSC, ref_BRE)
        h = self.proj_out(h) if self.linear else h
        h = h.reshape(B, H, W, C)
        return (h if self.linear else self.proj_out(h)) + x_BHWC


def _resnet(in_ch: int, out_ch: int, cfg: UNetConfig, rngs: nnx.Rngs) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, rngs=rngs,
        **dtypes_of(cfg),
    )  # fmt: skip


class DownBlock(nnx.Module):
    """diffusers' CrossAttnDownBlock2D (with attention) or DownBlock2D (without)."""

    def __init__(self, in_ch, out_ch, attention: bool, downsample: bool, cfg, *, rngs):
        n, self.remat = cfg.layers_per_block, remat_mode(cfg)
        self.resnets = nnx.List(
            [_resnet(in_ch if j == 0 else out_ch, out_ch, cfg, rngs) for j in range(n)]
        )
        transformers = [Transformer2DModel(out_ch, cfg, rngs=rngs) for _ in range(n * attention)]
        self.attentions = nnx.List(transformers) if attention else None
        self.downsamplers = (
            nnx.List([Downsample2D(out_ch, ((1, 1), (1, 1)), rngs=rngs, **dtypes_of(cfg))])
            if downsample else None
        )  # fmt: skip

    def __call__(self, x, temb, context, ref):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = call_maybe_remat(self.remat, resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, ref)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.remat = remat_mode(cfg)
        self.resnets = nnx.List([_resnet(ch, ch, cfg, rngs), _resnet(ch, ch, cfg, rngs)])
        self.attentions = nnx.List([Transformer2DModel(ch, cfg, rngs=rngs)])

    def __call__(self, x, temb, context, ref):
        x = call_maybe_remat(self.remat, self.resnets[0], x, temb)
        x = self.attentions[0](x, context, ref)
        return call_maybe_remat(self.remat, self.resnets[1], x, temb)


class UpBlock(nnx.Module):
    """diffusers' CrossAttnUpBlock2D / UpBlock2D: each resnet takes one skip, concatenated last."""

    def __init__(self, in_ch, prev_ch, out_ch, attention: bool, upsample: bool, cfg, *, rngs):
        n, self.remat = cfg.layers_per_block + 1, remat_mode(cfg)
        in_widths = [
            (prev_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch) for j in range(n)
        ]
        self.resnets = nnx.List([_resnet(w, out_ch, cfg, rngs) for w in in_widths])
        transformers = [Transformer2DModel(out_ch, cfg, rngs=rngs) for _ in range(n * attention)]
        self.attentions = nnx.List(transformers) if attention else None
        self.upsamplers = (
            nnx.List([Upsample2D(out_ch, rngs=rngs, **dtypes_of(cfg))]) if upsample else None
        )

    def __call__(self, x, skips, temb, context, ref):
        for j, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = call_maybe_remat(self.remat, resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, ref)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNet(nnx.Module):
    """Noise prediction from (sample (B,H,W,C_in), timesteps (B,), text context (B,L,768),
    semantic tokens (B,R,ref_dim) when the adapter is on)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt, ch = dtypes_of(cfg), cfg.block_out_channels
        self.conv_in = torch_conv(cfg.in_channels, ch[0], 3, rngs=rngs, **dt)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, rngs=rngs, **dt)
        n = len(ch)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.attention_levels[i], i < n - 1, cfg, rngs=rngs)
            for i in range(n)
        ])  # fmt: skip
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
        up_ch, up_attention = ch[::-1], cfg.attention_levels[::-1]
        self.up_blocks = nnx.List([
            UpBlock(up_ch[min(i + 1, n - 1)], up_ch[max(i - 1, 0)], up_ch[i], up_attention[i],
                    i < n - 1, cfg, rngs=rngs)
            for i in range(n)
        ])  # fmt: skip
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, rngs=rngs, **dt)
        self.conv_out = torch_conv(ch[0], cfg.out_channels, 3, rngs=rngs, **dt)

    def __call__(
        self, sample_BHWC: jax.Array, timesteps_B: jax.Array, context_BLD: jax.Array,
        ref_tokens_BRE: jax.Array | None = None,
    ) -> jax.Array:  # fmt: skip
        cfg = self.config
        if cfg.ref_adapter and ref_tokens_BRE is None:
            raise ValueError("this UNet has the reference adapter: pass ref_tokens (B,R,ref_dim)")
        if not cfg.ref_adapter and ref_tokens_BRE is not None:
            raise ValueError("ref_tokens given, but this UNet has no adapter (ref_adapter=False)")
        B, H, W, _ = sample_BHWC.shape
        factor = cfg.downsampling_factor
        if H % factor or W % factor:
            raise ValueError(f"sample size {H}x{W} must be a multiple of {factor}")
        compute = jnp.dtype(cfg.dtype)
        t_B = jnp.broadcast_to(jnp.asarray(timesteps_B).reshape(-1), (B,))
        t_emb = timestep_embedding(
            t_B, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        )
        temb = self.time_embedding(t_emb.astype(compute))
        context = context_BLD.astype(compute)
        ref = None if ref_tokens_BRE is None else ref_tokens_BRE.astype(compute)

        h = self.conv_in(sample_BHWC.astype(compute))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, ref)
            skips += block_skips
        h = self.mid_block(h, temb, context, ref)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], temb, context, ref)
            skips = skips[:-n]
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))

    @classmethod
    def from_state_dict(
        cls, cfg: UNetConfig, state: dict[str, Any], *, source_name: str, rename=None,
        init_missing_adapter: bool = False, seed: int = 0, place=None,
    ):  # fmt: skip
        """Builds a UNet from a PyTorch-style state dict (names via `rename`); (model, LoadReport).

        With `init_missing_adapter`, an adapter wholly absent from `state` is initialised
        (`init_adapter_state`, from `seed`) and listed in the report; else its absence is an error.
        """
        from catflax.weights import convert

        name = rename or (lambda k: k)
        conv_in = state.get(name("conv_in.weight"))
        if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != cfg.in_channels:
            raise _load_error(
                source_name,
                f"the file's UNet takes {conv_in.shape[1]} input channels, this one "
                f"{cfg.in_channels} (SD-1.5-inpainting: 4 noisy latents + 1 mask + 4 masked-image "
                "latents; a 4-channel file is a text-to-image UNet)",
                mismatched=[f"{name('conv_in.weight')}: {tuple(conv_in.shape)}"],
            )
        abstract = abstract_module(lambda rngs: cls(cfg, rngs=rngs), seed)
        fresh = {}
        if cfg.ref_adapter:
            adapter = init_adapter_state(abstract, rename, seed)
            if not any(k in state for k in adapter):
                if not init_missing_adapter:
                    raise _load_error(
                        source_name,
                        "no reference-adapter weights (ref_attn/ref_norm; attn3/norm4 in CAT "
                        "checkpoints): pass init_missing_adapter=True to start them fresh "
                        "(stage 1b), or ref_adapter=False for plain SD-1.5-inpainting",
                        missing=sorted(adapter),
                    )
                fresh = adapter
        model, report = convert.load_state_dict(
            abstract, {**state, **fresh}, source_name=source_name, rename=rename, place=place
        )
        if fresh:
            names = convert.torch_names(abstract, rename)
            report = convert.LoadReport(
                loaded=[k for k in report.loaded if k not in fresh],
                initialised=sorted(convert.path_str(p) for p, n in names.items() if n.key in fresh),
            )
        return model, report

    @classmethod
    def from_pretrained(
        cls, path: str, *, config: UNetConfig | None = None, allow_pickle: bool = False,
        init_missing_adapter: bool = False, seed: int = 0, place=None,
        output_loading_info: bool = False, variant: str | None = None, **overrides,
    ):  # fmt: skip
        """Loads a diffusers directory (a pipeline root with unet/, or the unet/ folder itself) or
        an LDM / CAT-Diffusion single-file checkpoint (.safetensors; .ckpt with allow_pickle).

        A diffusers config.json gives the sizes: `config` and `overrides` may set dtype,
        attention, remat, ref_adapter, ref_dim, but not contradict it. A single file takes
        `config` (default SD-1.5-inpainting + adapter) with `overrides`. `variant` (e.g.
        "fp16") picks a directory's diffusion_pytorch_model.<variant>.safetensors files (a
        directory with only one variant loads it without being told). Returns the model, or
        (model, LoadReport).
        """
        import os

        from catflax.weights import diffusers_format, io, ldm

        kw = dict(allow_pickle=allow_pickle, init_missing_adapter=init_missing_adapter,
                  seed=seed, place=place)  # fmt: skip
        if os.path.isdir(path):  # a given `config` must agree with config.json
            fields = dataclasses.asdict(config) if config else {}
            model, report = diffusers_format.load_unet(
                path, **kw, variant=variant, **{**fields, **overrides}
            )
        else:
            io.check_no_variant(path, variant)
            cfg = dataclasses.replace(config or CAT_UNET, **overrides)
            model, report = ldm.load_unet(path, cfg, **kw)
        return (model, report) if output_loading_info else model


def _load_error(source: str, note: str, **keys):
    from catflax.weights.convert import WeightLoadError

    err = WeightLoadError(source, **keys)
    err.args = (f"{err.args[0]}\n  {note}",)
    return err


def adapter_param_count(model: UNet) -> int:
    """Number of scalars in the reference adapter's parameters."""
    from catflax.weights import convert

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return sum(
        math.prod(v.get_value().shape) for p, v in flat if is_adapter_param(convert.path_str(p))
    )
