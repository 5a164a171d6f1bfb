"""Pieces shared by the towers: activations, attention and feed-forward modules, PyTorch inits.

Module and parameter names follow diffusers (`to_q`, `to_out.0`, `ff.net.0.proj`) so that
`catflax.weights.convert.torch_names` gives diffusers' state-dict names directly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from catflax.models.attention import dot_product_attention


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` in transformers/diffusers configs."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------
# PyTorch default initialisation
# ---------------------------------------------------------------------------------------------
# nn.Linear and nn.Conv2d draw weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# (kaiming_uniform with a=sqrt(5)); nn.LayerNorm / nn.GroupNorm start at weight 1, bias 0, which
# are nnx's norm defaults. The reference adapter is new in CAT-Diffusion and starts this way.


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(
    in_features: int, out_features: int, *, use_bias: bool = True, rngs: nnx.Rngs, **dtypes
) -> nnx.Linear:
    """nnx.Linear initialised like PyTorch's nn.Linear."""
    init = _uniform(1.0 / math.sqrt(in_features))
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, kernel_init=init, bias_init=init,
        rngs=rngs, **dtypes,
    )  # fmt: skip


def torch_conv(
    in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, padding: Any = None,
    use_bias: bool = True, rngs: nnx.Rngs, **dtypes,
) -> nnx.Conv:  # fmt: skip
    """A 2-D nnx.Conv (NHWC) initialised like PyTorch's nn.Conv2d; default padding keeps size."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    init = _uniform(1.0 / math.sqrt(in_channels * kernel * kernel))
    return nnx.Conv(
        in_channels, out_channels, (kernel, kernel), strides=stride, padding=padding,
        use_bias=use_bias, kernel_init=init, bias_init=init, rngs=rngs, **dtypes,
    )  # fmt: skip


def group_norm(
    channels: int, groups: int, eps: float, *, rngs: nnx.Rngs, **dtypes
) -> nnx.GroupNorm:
    """GroupNorm over NHWC (or N,L,C) with PyTorch's two-pass variance."""
    return nnx.GroupNorm(
        channels, num_groups=groups, epsilon=eps, use_fast_variance=False, rngs=rngs, **dtypes
    )


def layer_norm(width: int, eps: float, *, rngs: nnx.Rngs, **dtypes) -> nnx.LayerNorm:
    """nnx.LayerNorm with PyTorch's two-pass variance (flax's default, E[x^2] - E[x]^2, loses
    precision when the mean is large against the spread, as in CLIP's hidden states)."""
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs, **dtypes)


def dtypes_of(cfg) -> dict[str, Any]:
    """The module dtype arguments of a config with `dtype` (compute) and `param_dtype` fields."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


# What a rematerialised block keeps from its forward pass (`remat_policy` of the model configs):
# "full" keeps nothing (least memory, one more forward); "dots" keeps matmul outputs without
# batch dimensions (attention and MLP projections), recomputing norms, activations and convs.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_mode(cfg) -> str | None:
    """A config's activation checkpointing: None (off) or its `remat_policy` name."""
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ValueError(
            f"remat_policy={cfg.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}"
        )
    return cfg.remat_policy if cfg.remat else None


def remat(fn: Callable, mode: str | None) -> Callable:
    """nnx.remat(fn) with the policy that `mode` names (see REMAT_POLICIES)."""
    return nnx.remat(fn, policy=REMAT_POLICIES[mode])


def call_maybe_remat(mode: str | None, module: nnx.Module, *args) -> Any:
    """module(*args), recomputed in the backward pass when `mode` names a remat policy."""
    if mode:
        return remat(lambda m, *a: m(*a), mode)(module, *args)
    return module(*args)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class Identity(nnx.Module):
    """A parameter-free placeholder (diffusers' Dropout slots), so list indices match."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class Attention(nnx.Module):
    """Multi-head (cross-)attention as diffusers' `Attention`: to_q/to_k/to_v, then to_out.0."""

    def __init__(
        self, query_dim: int, context_dim: int | None, num_heads: int, head_dim: int, *,
        qkv_bias: bool = False, implementation: str = "xla", rngs: nnx.Rngs, **dtypes,
    ):  # fmt: skip
        inner = num_heads * head_dim
        context_dim = context_dim or query_dim
        self.num_heads, self.head_dim, self.implementation = num_heads, head_dim, implementation
        self.to_q = torch_linear(query_dim, inner, use_bias=qkv_bias, rngs=rngs, **dtypes)
        self.to_k = torch_linear(context_dim, inner, use_bias=qkv_bias, rngs=rngs, **dtypes)
        self.to_v = torch_linear(context_dim, inner, use_bias=qkv_bias, rngs=rngs, **dtypes)
        self.to_out = nnx.List([torch_linear(inner, query_dim, rngs=rngs, **dtypes)])

    def __call__(self, x_BTD: jax.Array, context_BSC: jax.Array | None = None) -> jax.Array:
        context_BSC = x_BTD if context_BSC is None else context_BSC
        B, T, _ = x_BTD.shape
        heads = lambda t: t.reshape(B, t.shape[1], self.num_heads, self.head_dim)  # noqa: E731
        out_BTNH = dot_product_attention(
            heads(self.to_q(x_BTD)),
            heads(self.to_k(context_BSC)),
            heads(self.to_v(context_BSC)),
            implementation=self.implementation,
        )
        return self.to_out[0](out_BTNH.reshape(B, T, self.num_heads * self.head_dim))


class GEGLU(nnx.Module):
    """proj to 2x width, split into (hidden, gate), hidden * gelu(gate) (exact gelu)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, **dtypes):
        self.proj = torch_linear(dim_in, 2 * dim_out, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers' FeedForward with GEGLU: net.0 (GEGLU), net.1 (dropout), net.2 (Linear)."""

    def __init__(self, dim: int, mult: int = 4, *, rngs: nnx.Rngs, **dtypes):
        inner = dim * mult
        geglu = GEGLU(dim, inner, rngs=rngs, **dtypes)
        self.net = nnx.List([geglu, Identity(), torch_linear(inner, dim, rngs=rngs, **dtypes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x
