"""Splash attention: jax's Pallas TPU flash kernel behind catflax's attention interface
(`catflax.models.attention.dot_product_attention(..., implementation="splash")`)."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from catflax.sharding import BATCH_AXES

PALLAS_INTERPRET_ENV = "CATFLAX_PALLAS_INTERPRET"

# Splash attention (TPU Pallas). The kernel wants (heads, seq, head_dim) per example with seq a
# multiple of its blocks and no softmax scale; pad and scale here. GSPMD cannot partition a Pallas
# call (jax refuses to lower one in a multi-device jit), so it runs in a shard_map over the mesh
# that `jax.set_mesh` makes current, split like MaxText's: batch over data/fsdp, heads over tensor.
_SPLASH_LANES = 128  # sequence blocks and the padded head_dim are multiples of this
_SPLASH_MAX_BLOCK = 512


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_block(length: int) -> int:
    """The largest multiple of 128, at most _SPLASH_MAX_BLOCK, that divides `length`."""
    return max(
        b for b in range(_SPLASH_LANES, _SPLASH_MAX_BLOCK + 1, _SPLASH_LANES) if length % b == 0
    )


def pallas_interpret() -> bool:
    """Whether Pallas kernels run in interpret mode ($CATFLAX_PALLAS_INTERPRET=1, read at trace)."""
    return os.environ.get(PALLAS_INTERPRET_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, is_causal: bool, interpret: bool):
    """A splash MHA kernel for one example of (heads, q_len | kv_len, head_dim)."""
    bq, bkv = _splash_block(q_len), _splash_block(kv_len)
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )  # fmt: skip
    shape = (q_len, kv_len)
    one = splash.CausalMask(shape) if is_causal else splash.FullMask(shape)
    # Concrete mask tables even when first built inside a jit trace, so caching them is safe.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(
            splash.MultiHeadMask([one] * heads), block_sizes=blocks, interpret=interpret
        )


def _key_padding(mask: jax.Array | None, B: int, S: int) -> jax.Array | None:
    """A mask broadcastable to (B,1,1,S) as (B,S) bool; other masks are not supported."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        raise NotImplementedError(
            "attention implementation 'splash' takes only key-padding masks (broadcastable to "
            f"B,1,1,S); got a mask of shape {mask.shape}. Use 'xla' or 'chunked' for this mask."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (B, S))


def splash_attention(q, k, v, mask, is_causal):
    """Splash attention on BTNH arrays; `mask` may only be a key-padding mask.

    head_dim is zero-padded to a multiple of 128 (q.k is unchanged; q is scaled by
    1/sqrt(head_dim) here), T and S to multiples of 128; padded keys, and keys a padding mask
    excludes, are cut off with segment ids. A causal mask is aligned top-left, like XLA's. A row
    whose keys are all masked gets a meaningless output (XLA's gives the mean of the values).
    """
    interpret = pallas_interpret()
    if not interpret and jax.default_backend() != "tpu":
        raise RuntimeError(
            "attention implementation 'splash' is a TPU Pallas kernel, but the jax backend is "
            f"{jax.default_backend()!r}: use 'xla' or 'chunked' here, or set "
            f"{PALLAS_INTERPRET_ENV}=1 to run it (slowly) in Pallas interpret mode."
        )
    B, T, N, H = q.shape
    S = k.shape[1]
    kv_valid_BS = _key_padding(mask, B, S)
    T_pad, S_pad, H_pad = (_round_up(n, _SPLASH_LANES) for n in (T, S, H))
    q = q * jnp.asarray(1.0 / math.sqrt(H), q.dtype)

    def to_kernel_layout(x, length):  # B,L,N,H -> B,N,L_pad,H_pad
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, H_pad - H)))
        return jnp.swapaxes(x, 1, 2)

    q, k, v = to_kernel_layout(q, T_pad), to_kernel_layout(k, S_pad), to_kernel_layout(v, S_pad)
    segment_ids = None
    if S_pad > S or kv_valid_BS is not None:  # a query sees only keys whose id equals its own (1)
        kv_ids = jnp.arange(S_pad) < S
        if kv_valid_BS is not None:
            kv_ids = kv_ids & jnp.pad(kv_valid_BS, ((0, 0), (0, S_pad - S)))
        segment_ids = (
            jnp.ones((B, T_pad), jnp.int32),
            jnp.broadcast_to(kv_ids, (B, S_pad)).astype(jnp.int32),
        )

    def attend(q_BNTH, k_BNSH, v_BNSH, segment_ids):
        kernel = _splash_kernel(q_BNTH.shape[1], T_pad, S_pad, is_causal, interpret)
        if segment_ids is not None:
            segment_ids = splash.SegmentIds(*segment_ids)
        return jax.vmap(kernel)(q_BNTH, k_BNSH, v_BNSH, segment_ids)

    mesh = jax.sharding.get_abstract_mesh()
    manual = jax.sharding.AxisType.Manual
    if mesh.empty or manual in mesh.axis_types:  # no mesh, or already inside a shard_map
        out = attend(q, k, v, segment_ids)
    else:
        batch_axes, split = [], 1  # the batch axes that divide B (as sharding.partition_spec)
        for axis in BATCH_AXES:
            if axis in mesh.axis_names and B % (split * mesh.shape[axis]) == 0:
                batch_axes.append(axis)
                split *= mesh.shape[axis]
        batch = tuple(batch_axes) or None
        heads = "tensor" if "tensor" in mesh.axis_names and N % mesh.shape["tensor"] == 0 else None
        spec = jax.P(batch, heads, None, None)
        ids_spec = None if segment_ids is None else (jax.P(batch, None),) * 2
        # check_vma=False: the kernel's pallas_call declares no varying mesh axes for its outputs.
        out = jax.shard_map(
            attend, mesh=mesh, in_specs=(spec, spec, spec, ids_spec), out_specs=spec,
            check_vma=False,
        )(q, k, v, segment_ids)  # fmt: skip
    return jnp.swapaxes(out, 1, 2)[:, :T, :, :H]
