"""Pieces shared by the towers: activations and multi-head attention kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "chunked")


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


def dot_product_attention(
    query_BTNH: jax.Array,
    key_BSNH: jax.Array,
    value_BSNH: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
    query_chunk_size: int = 1024,
) -> jax.Array:
    """Softmax attention; `mask` (bool, broadcastable to B,N,T,S) is True where attention is allowed.

    `xla` and `cudnn` go through `jax.nn.dot_product_attention` (cuDNN flash attention needs a GPU
    and fp16/bf16 inputs); `chunked` processes queries in chunks so the score matrix never
    exceeds chunk x S, for long sequences on CPU/TPU.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation == "chunked":
        return _chunked_attention(
            query_BTNH, key_BSNH, value_BSNH, mask, is_causal, query_chunk_size
        )
    return jax.nn.dot_product_attention(
        query_BTNH,
        key_BSNH,
        value_BSNH,
        mask=mask,
        is_causal=is_causal,
        implementation=implementation,
    )


def _chunked_attention(q, k, v, mask, is_causal, chunk):
    """Attention over query chunks with lax.map: memory O(chunk * S) instead of O(T * S)."""
    B, T, N, H = q.shape
    S = k.shape[1]
    if T <= chunk:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    pad = (-T) % chunk
    q_pad = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    n_chunks = (T + pad) // chunk
    if mask is not None:
        mask = jnp.broadcast_to(mask, (B, N, T, S))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    scale = 1.0 / jnp.sqrt(jnp.asarray(H, jnp.float32))

    def one_chunk(i):
        start = i * chunk
        q_c = jax.lax.dynamic_slice_in_dim(q_pad, start, chunk, axis=1)
        logits = jnp.einsum("btnh,bsnh->bnts", q_c, k, preferred_element_type=jnp.float32)
        logits = logits * scale
        allowed = None
        if mask is not None:
            allowed = jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=2)
        if is_causal:
            rows = start + jnp.arange(chunk)[:, None]
            causal = rows >= jnp.arange(S)[None, :]
            allowed = causal if allowed is None else allowed & causal
        if allowed is not None:
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)

    out = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # (chunks, B, chunk, N, H)
    out = jnp.moveaxis(out, 0, 1).reshape(B, n_chunks * chunk, N, H)
    return out[:, :T]
