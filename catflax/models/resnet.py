"""diffusers' ResnetBlock2D, Downsample2D and Upsample2D (NHWC): the conv blocks of the UNet and
the VAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from catflax.models.layers import group_norm, torch_conv, torch_linear


class ResnetBlock2D(nnx.Module):
    """(GroupNorm, SiLU, conv) twice with the time embedding added between; 1x1 conv shortcut
    when the widths differ."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int | None, groups: int, eps: float, *,
        rngs: nnx.Rngs, **dt,
    ):  # fmt: skip
        self.norm1 = group_norm(in_ch, groups, eps, rngs=rngs, **dt)
        self.conv1 = torch_conv(in_ch, out_ch, 3, rngs=rngs, **dt)
        self.time_emb_proj = torch_linear(temb_dim, out_ch, rngs=rngs, **dt) if temb_dim else None
        self.norm2 = group_norm(out_ch, groups, eps, rngs=rngs, **dt)
        self.conv2 = torch_conv(out_ch, out_ch, 3, rngs=rngs, **dt)
        self.conv_shortcut = (
            torch_conv(in_ch, out_ch, 1, rngs=rngs, **dt) if in_ch != out_ch else None
        )

    def __call__(self, x_BHWC: jax.Array, temb_BD: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb_BD))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x_BHWC = self.conv_shortcut(x_BHWC)
        return x_BHWC + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; `padding` ((1,1),(1,1)) in the UNet, ((0,1),(0,1)) in the VAE."""

    def __init__(self, ch: int, padding, *, rngs: nnx.Rngs, **dt):
        self.conv = torch_conv(ch, ch, 3, stride=2, padding=padding, rngs=rngs, **dt)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.conv(x_BHWC)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, ch: int, *, rngs: nnx.Rngs, **dt):
        self.conv = torch_conv(ch, ch, 3, rngs=rngs, **dt)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2))
