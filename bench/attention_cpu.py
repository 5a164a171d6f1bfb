"""An experiment, not library code: query-blocked softmax attention for XLA:CPU.

`jax.nn.dot_product_attention(implementation="xla")` (what `catflax.models.layers` calls) is
slow on XLA:CPU at the UNet's long self-attention (T = S = 1024 tokens at 256 px, 4096 at
512 px): it materialises the whole (B,N,T,S) score block with a (B,T,N,H) layout. Working in
(B,N,T,H) layout on query blocks of `QUERY_CHUNK` rows, each recomputed in the backward pass,
keeps a block's scores in cache. `patched()` swaps it in for unmasked, non-causal "xla" calls
(UNet, VAE and inpainter attention; CLIP text stays on the original) so `bench/vs_pytorch.py
--variants=blocked_attention` can measure the whole step with it.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

QUERY_CHUNK = 256


def blocked_attention(
    query_BTNH: jax.Array, key_BSNH: jax.Array, value_BSNH: jax.Array,
    query_chunk: int = QUERY_CHUNK,
) -> jax.Array:  # fmt: skip
    """softmax(q k^T / sqrt(H)) v, computed per block of `query_chunk` queries."""
    B, T, N, H = query_BTNH.shape
    q_BNTH = jnp.swapaxes(query_BTNH, 1, 2) * jnp.asarray(1.0 / math.sqrt(H), query_BTNH.dtype)
    k_BNSH, v_BNSH = jnp.swapaxes(key_BSNH, 1, 2), jnp.swapaxes(value_BSNH, 1, 2)

    def block(q_BNtH):
        s = jnp.einsum("bnth,bnsh->bnts", q_BNtH, k_BNSH, preferred_element_type=jnp.float32)
        p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))  # shift: no gradient
        out = jnp.einsum(
            "bnts,bnsh->bnth", p.astype(v_BNSH.dtype), v_BNSH, preferred_element_type=jnp.float32
        )
        return (out / p.sum(-1, keepdims=True)).astype(query_BTNH.dtype)

    if T <= query_chunk or T % query_chunk:
        out_BNTH = block(q_BNTH)
    else:
        chunks = q_BNTH.reshape(B, N, T // query_chunk, query_chunk, H).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(jax.checkpoint(block), chunks)  # (T/chunk, B, N, chunk, H)
        out_BNTH = out.transpose(1, 2, 0, 3, 4).reshape(B, N, T, H)
    return jnp.swapaxes(out_BNTH, 1, 2)


@contextlib.contextmanager
def patched(query_chunk: int = QUERY_CHUNK):
    """Within the block, the model modules' unmasked, non-causal "xla" attention is blocked."""
    from catflax.models import clip, layers, vae

    original = layers.dot_product_attention

    def attention(q, k, v, *, mask=None, is_causal=False, implementation="xla", **kw):
        if mask is None and not is_causal and implementation == "xla":
            return blocked_attention(q, k, v, query_chunk)
        return original(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation,
                        **kw)  # fmt: skip

    modules = (layers, clip, vae)
    for module in modules:
        module.dot_product_attention = attention
    try:
        yield
    finally:
        for module in modules:
            module.dot_product_attention = original
