"""Softmax attention kernels: XLA (heads-major), chunked with FlashAttention's backward, cuDNN,
and Pallas splash (catflax.models.splash). `dot_product_attention` picks one by name."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from catflax.models.splash import splash_attention

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "splash")
_TRACE_AS_XLA = contextvars.ContextVar("catflax_trace_attention_as_xla", default=False)


@contextlib.contextmanager
def traced_as_xla():
    """Inside, every attention traces as `xla`, whatever its module asks: for counting FLOPs
    (XLA's cost analysis counts a loop body such as `chunked`'s once, and a kernel custom call
    such as cuDNN's or splash's not at all)."""
    token = _TRACE_AS_XLA.set(True)
    try:
        yield
    finally:
        _TRACE_AS_XLA.reset(token)


# What jax.nn.dot_product_attention puts on disallowed logits (a fully masked row stays finite).
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(
    query_BTNH: jax.Array,
    key_BSNH: jax.Array,
    value_BSNH: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
    query_chunk_size: int = 256,
    key_chunk_size: int = 4096,
) -> jax.Array:
    """Softmax attention; `mask` (bool, broadcastable to B,N,T,S) is True where allowed.

    `xla`: jax.nn.dot_product_attention's math (fp32 logits and softmax) with the heads moved in
    front of the sequence, (B,N,T,H), a layout XLA:CPU runs 2-4x faster. `cudnn`: jax's cuDNN
    flash attention (a CUDA GPU, fp16/bf16 inputs; odd lengths padded; shapes it has no kernel
    for, such as head dim > 128 before Hopper, fall back to `xla` with a warning). `chunked`:
    queries in blocks of query_chunk; keys all at once up to key_chunk with FlashAttention's
    backward (fastest on CPU), longer key sets in chunks with an online softmax, so no score
    block exceeds query_chunk x key_chunk. `splash`: jax's Pallas TPU flash kernel, on a TPU or
    anywhere with $CATFLAX_PALLAS_INTERPRET=1; on a multi-device jit, trace under
    `jax.set_mesh(mesh)`.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}"
        )
    if _TRACE_AS_XLA.get():
        implementation = "xla"
    if implementation == "chunked":
        return _chunked_attention(
            query_BTNH, key_BSNH, value_BSNH, mask, is_causal, query_chunk_size, key_chunk_size
        )
    if implementation == "splash":
        return splash_attention(query_BTNH, key_BSNH, value_BSNH, mask, is_causal)
    if implementation == "xla":
        return _heads_major_attention(query_BTNH, key_BSNH, value_BSNH, mask, is_causal)
    if query_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"cudnn attention needs bfloat16 or float16 inputs, got {query_BTNH.dtype}: "
            "set the model's dtype to bfloat16, or use attention 'xla'"
        )
    try:
        return even_length_attention(query_BTNH, key_BSNH, value_BSNH, mask, is_causal, "cudnn")
    except NotImplementedError as err:  # no cuDNN kernel for this shape on this GPU
        _warn_cudnn_fallback(query_BTNH.shape, key_BSNH.shape, str(err))
        return _heads_major_attention(query_BTNH, key_BSNH, value_BSNH, mask, is_causal)


@functools.cache
def _warn_cudnn_fallback(q_shape, k_shape, reason: str) -> None:
    logging.warning(
        "cudnn attention has no kernel for queries %s, keys %s (%s): this attention uses 'xla'",
        q_shape, k_shape, reason,
    )  # fmt: skip


def even_length_attention(q_BTNH, k_BSNH, v_BSNH, mask, is_causal, implementation="cudnn"):
    """jax.nn.dot_product_attention with query and key lengths padded to even numbers and masks
    broadcast to (B|1, N|1, T, S), what jax's cuDNN kernels accept in training: they reject odd
    lengths (the 77 CLIP text tokens of the UNet's cross-attention) and smaller masks. Padded
    keys are masked out (by length, or in the mask); padded queries are sliced off."""
    B, T, _, _ = q_BTNH.shape
    S = k_BSNH.shape[1]
    pad_T, pad_S = T % 2, S % 2
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    q, k, v = pad(q_BTNH, pad_T), pad(k_BSNH, pad_S), pad(v_BSNH, pad_S)
    lengths = {}
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], T, S))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_T), (0, pad_S)))  # padding: disallowed
    elif pad_T or pad_S:
        lengths = dict(
            query_seq_lengths=jnp.full((B,), T, jnp.int32),
            key_value_seq_lengths=jnp.full((B,), S, jnp.int32),
        )
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation, **lengths
    )
    return out[:, :T]


def _heads_major_attention(q_BTNH, k_BSNH, v_BSNH, mask, is_causal):
    """softmax(q k^T / sqrt(H) | mask) v in (B,N,T,H) layout, logits and softmax in fp32."""
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTNH, k_BSNH, v_BSNH))
    logits = _scaled_logits(q, k, _allowed(mask, is_causal, q.shape[2], k.shape[2]))
    unnormalised = jnp.exp(logits - jax.lax.stop_gradient(_row_max(logits))[..., None])
    probs = (unnormalised / unnormalised.sum(-1, keepdims=True)).astype(v.dtype)
    out = jnp.einsum("bnts,bnsh->bnth", probs, v, preferred_element_type=jnp.float32)
    return jnp.swapaxes(out, 1, 2).astype(q_BTNH.dtype)


def _row_max(x: jax.Array) -> jax.Array:
    """x.max(-1), computed by folding halves of the last axis with elementwise maximums first:
    XLA:CPU runs a reduction ~4x slower than an elementwise loop at attention sizes."""
    while x.shape[-1] > 16 and x.shape[-1] % 2 == 0:
        half = x.shape[-1] // 2
        x = jnp.maximum(x[..., :half], x[..., half:])
    return x.max(-1)


def _allowed(mask, is_causal, T, S):
    """Where logits count (bool, broadcastable to B,N,T,S), or None for everywhere."""
    if is_causal:
        causal = jnp.tril(jnp.ones((T, S), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    return mask


def _scaled_logits(q_BNTH, k_BNSH, allowed):
    logits = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(q_BNTH.shape[-1]))
    return logits if allowed is None else jnp.where(allowed, logits, _MASKED_LOGIT)


def _softmax_attention_forward(q, k, v, allowed):
    """(out f32, row max, row sum) in (B,N,T,.) layout; the output is normalised after the
    probabilities-times-values dot."""
    logits = _scaled_logits(q, k, allowed)
    row_max = _row_max(logits)[..., None]
    probs = jnp.exp(logits - row_max)  # unnormalised
    row_sum = probs.sum(-1, keepdims=True)
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # fmt: skip
    return out / row_sum, row_max, row_sum


@jax.custom_vjp
def _softmax_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(H) | allowed) v, (B,N,T,H) layout, with FlashAttention's backward:
    probabilities recomputed from the saved row max and sum, and the softmax's row term taken
    as sum(dout * out) over H rather than over the S keys. Saves O(T) per row, not O(T S)."""
    return _softmax_attention_forward(q, k, v, allowed)[0].astype(q.dtype)


def _softmax_attention_fwd(q, k, v, allowed):
    out, row_max, row_sum = _softmax_attention_forward(q, k, v, allowed)
    out = out.astype(q.dtype)
    return out, (q, k, v, allowed, out, row_max, row_sum)


def _softmax_attention_bwd(residuals, dout):
    q, k, v, allowed, out, row_max, row_sum = residuals
    probs = jnp.exp(_scaled_logits(q, k, allowed) - row_max) / row_sum
    dv = jnp.einsum("bnts,bnth->bnsh", probs.astype(dout.dtype), dout,
                    preferred_element_type=jnp.float32)  # fmt: skip
    dprobs = jnp.einsum("bnth,bnsh->bnts", dout, v, preferred_element_type=jnp.float32)
    row_term = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    dlogits = probs * (dprobs - row_term) * jnp.float32(1.0 / math.sqrt(q.shape[-1]))
    if allowed is not None:  # disallowed logits are constants (matters in fully masked rows)
        dlogits = jnp.where(allowed, dlogits, 0.0)
    dlogits = dlogits.astype(q.dtype)
    dq = jnp.einsum("bnts,bnsh->bnth", dlogits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnts,bnth->bnsh", dlogits, q, preferred_element_type=jnp.float32)
    dallowed = None if allowed is None else np.zeros(allowed.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dallowed


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _one_pass_attention(q_BTNH, k_BSNH, v_BSNH, allowed):
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTNH, k_BSNH, v_BSNH))
    return jnp.swapaxes(_softmax_attention(q, k, v, allowed), 1, 2)


def _query_blocked_attention(q_BTNH, k_BSNH, v_BSNH, allowed, q_chunk):
    """Every key at once, queries in blocks of q_chunk: a block's scores stay in cache, which
    makes XLA:CPU ~2x faster at T = S = 1024. `allowed` must not vary along T."""
    B, T, N, H = q_BTNH.shape
    blocks = q_BTNH.reshape(B, T // q_chunk, q_chunk, N, H).transpose(1, 0, 3, 2, 4)  # n,B,N,q,H
    k, v = jnp.swapaxes(k_BSNH, 1, 2), jnp.swapaxes(v_BSNH, 1, 2)  # once, not per block
    out = jax.lax.map(lambda q: _softmax_attention(q, k, v, allowed), blocks)
    return out.transpose(1, 0, 3, 2, 4).reshape(B, T, N, H)


def _chunked_attention(q, k, v, mask, is_causal, q_chunk, kv_chunk):
    """Flash-style attention in pure JAX: lax.map over query chunks, lax.scan over key chunks."""
    B, T, N, H = q.shape
    S = k.shape[1]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    if T <= q_chunk and S <= kv_chunk:
        return _one_pass_attention(q, k, v, _allowed(mask, is_causal, T, S))
    key_padding_only = mask is None or (mask.ndim == 4 and mask.shape[2] == 1)  # (B|1,N|1,1,S)
    if S <= kv_chunk and T % q_chunk == 0 and not is_causal and key_padding_only:
        return _query_blocked_attention(q, k, v, mask, q_chunk)
    q_chunk, kv_chunk = min(q_chunk, T), min(kv_chunk, S)
    t_pad, s_pad = (-T) % q_chunk, (-S) % kv_chunk
    n_q, n_kv = (T + t_pad) // q_chunk, (S + s_pad) // kv_chunk
    q = jnp.pad(q, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    k_chunks = jnp.pad(k, ((0, 0), (0, s_pad), (0, 0), (0, 0))).reshape(B, n_kv, kv_chunk, N, H)
    v_chunks = jnp.pad(v, ((0, 0), (0, s_pad), (0, 0), (0, 0))).reshape(B, n_kv, kv_chunk, N, H)
    if mask is not None:  # keep size-1 axes size 1; only T and S are sliced per chunk
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        t_rows = t_pad if mask.shape[2] > 1 else 0
        s_cols = s_pad if mask.shape[3] > 1 else 0
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, t_rows), (0, s_cols)))
    scale = 1.0 / math.sqrt(H)

    def one_query_chunk(i):
        q_c = jax.lax.dynamic_slice_in_dim(q, i * q_chunk, q_chunk, axis=1)
        rows = i * q_chunk + jnp.arange(q_chunk)

        def one_key_chunk(carry, j):
            m, l, acc = carry  # running max and sum (B,N,tq), weighted values (B,tq,N,H), f32
            logits = (
                jnp.einsum(
                    "btnh,bsnh->bnts", q_c, k_chunks[:, j], preferred_element_type=jnp.float32
                )
                * scale
            )
            cols = j * kv_chunk + jnp.arange(kv_chunk)
            if mask is not None:
                m_c = mask
                if m_c.shape[2] > 1:
                    m_c = jax.lax.dynamic_slice_in_dim(m_c, i * q_chunk, q_chunk, axis=2)
                if m_c.shape[3] > 1:
                    m_c = jax.lax.dynamic_slice_in_dim(m_c, j * kv_chunk, kv_chunk, axis=3)
                logits = jnp.where(m_c, logits, _MASKED_LOGIT)
            if is_causal:
                logits = jnp.where(rows[:, None] >= cols[None, :], logits, _MASKED_LOGIT)
            logits = jnp.where(cols < S, logits, -jnp.inf)  # padding keys count for nothing
            m_new = jnp.maximum(m, _row_max(logits))
            p = jnp.exp(logits - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(-1)
            pv = jnp.einsum(
                "bnts,bsnh->btnh", p.astype(v.dtype), v_chunks[:, j],
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            acc = acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv
            return (m_new, l, acc), None

        init = (
            jnp.full((B, N, q_chunk), -jnp.inf, jnp.float32),
            jnp.zeros((B, N, q_chunk), jnp.float32),
            jnp.zeros((B, q_chunk, N, H), jnp.float32),
        )
        (_, l, acc), _ = jax.lax.scan(one_key_chunk, init, jnp.arange(n_kv))
        return (acc / jnp.moveaxis(l, 1, 2)[..., None]).astype(v.dtype)

    # Recompute each chunk in the backward pass, so its memory stays O(q_chunk * S).
    out = jax.lax.map(jax.checkpoint(one_query_chunk), jnp.arange(n_q))  # (n_q, B, tq, N, H)
    return jnp.moveaxis(out, 0, 1).reshape(B, n_q * q_chunk, N, H)[:, :T]
