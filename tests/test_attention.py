"""Attention kernels: the chunked (online-softmax) path equals XLA's; cuDNN where a GPU exists."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from catflax.models import attention as attention_lib
from catflax.models import layers
from catflax.train.steps import create_state, train_step
from tests.test_train_steps import split_for, with_attention
from tests.tiny import TINY_CAT, random_batch


def qkv(seed=0, B=2, T=37, S=53, N=3, H=8, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, (B, T, N, H), dtype),
        jax.random.normal(k2, (B, S, N, H), dtype),
        jax.random.normal(k3, (B, S, N, H), dtype),
    )


def chunked(q, k, v, **kw):
    kw = {"query_chunk_size": 8, "key_chunk_size": 16, **kw}
    return attention_lib.dot_product_attention(q, k, v, implementation="chunked", **kw)


def test_chunked_equals_xla_with_masks_and_causal():
    q, k, v = qkv()
    B, T, N, _ = q.shape
    S = k.shape[1]
    rng = np.random.default_rng(0)
    full_mask = rng.random((B, N, T, S)) > 0.3
    full_mask[0, 1, 5] = False  # a fully masked row: both give the mean of the values
    padding_mask = np.arange(S)[None, None, None, :] < np.array([40, 17])[:, None, None, None]
    cases = [
        dict(),
        dict(mask=jnp.asarray(full_mask)),
        dict(mask=jnp.asarray(padding_mask)),  # (B,1,1,S): broadcast over heads and queries
        dict(mask=jnp.asarray(full_mask[:, :1])),  # (B,1,T,S)
    ]
    for kw in cases:
        ref = jax.nn.dot_product_attention(q, k, v, **kw)
        ours = attention_lib.dot_product_attention(q, k, v, implementation="xla", **kw)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(chunked(q, k, v, **kw), ref, atol=1e-5, rtol=1e-5)
        if kw.get("mask") is None or kw["mask"].shape[2] == 1:  # queries in blocks, keys at once
            q40 = jnp.concatenate([q, q[:, :3]], axis=1)  # T = 40: five blocks of 8
            out = chunked(q40, k, v, key_chunk_size=S, **kw)
            ref40 = jax.nn.dot_product_attention(q40, k, v, **kw)
            np.testing.assert_allclose(out, ref40, atol=1e-5, rtol=1e-5)
    q, k, v = qkv(1, T=45, S=45)  # causal needs T == S for the XLA reference
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    ours = attention_lib.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(chunked(q, k, v, is_causal=True), ref, atol=1e-5, rtol=1e-5)


def test_chunked_matches_torch_sdpa():
    q, k, v = qkv(2, T=50, S=70)
    to_torch = lambda x: torch.from_numpy(np.array(x)).transpose(1, 2)  # noqa: E731  B,N,T,H
    ref = torch.nn.functional.scaled_dot_product_attention(to_torch(q), to_torch(k), to_torch(v))
    np.testing.assert_allclose(chunked(q, k, v), ref.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("T, key_chunk", [(20, 16), (40, 64)])  # online softmax; query blocks
def test_chunked_and_xla_gradients_equal_jax(T, key_chunk):
    q, k, v = qkv(3, T=T, S=33)

    def grads(attention):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    ref = grads(jax.nn.dot_product_attention)
    for got in (grads(attention_lib.dot_product_attention),
                grads(lambda q, k, v: chunked(q, k, v, key_chunk_size=key_chunk))):  # fmt: skip
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_one_pass_gradients_equal_jax_with_masks_and_causal():
    """The custom-VJP (FlashAttention-style backward) path: all queries or query blocks, keys at
    once; masked logits get no gradient, also in a fully masked row."""
    q, k, v = qkv(6, T=24, S=24)
    B, T, N, _ = q.shape
    rng = np.random.default_rng(1)
    full_mask = rng.random((B, N, T, T)) > 0.3
    full_mask[1, 2, 7] = False
    padding_mask = np.arange(T)[None, None, None, :] < np.array([24, 9])[:, None, None, None]
    cases = [  # (kwargs, query chunk): 24 = one pass; 8 = three query blocks
        (dict(mask=jnp.asarray(full_mask)), 24),
        (dict(mask=jnp.asarray(padding_mask)), 24),
        (dict(mask=jnp.asarray(padding_mask)), 8),
        (dict(is_causal=True), 24),
    ]

    def grads(attention, **kw):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, **kw)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for kw, q_chunk in cases:
        ref = grads(jax.nn.dot_product_attention, **kw)
        got = grads(chunked, query_chunk_size=q_chunk, key_chunk_size=T, **kw)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_chunked_in_bfloat16_is_close_to_float32():
    q, k, v = qkv(4, T=40, S=40)
    ref = attention_lib.dot_product_attention(q, k, v)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = chunked(*bf)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)
    # the custom-VJP backward in bf16 (one pass: all 40 queries at once) against fp32 autodiff
    loss = lambda attention: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))  # noqa: E731
    ref_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    one_pass = lambda q, k, v: chunked(q, k, v, query_chunk_size=40, key_chunk_size=40)  # noqa: E731
    bf_grads = jax.grad(loss(one_pass), argnums=(0, 1, 2))(*bf)
    for g, r in zip(bf_grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=2e-2, rtol=2e-2)


def test_attention_module_implementations_agree():
    dt = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    make = lambda impl: layers.Attention(  # noqa: E731
        16, 12, 2, 8, implementation=impl, rngs=nnx.Rngs(0), **dt
    )
    x = jax.random.normal(jax.random.key(0), (2, 70, 16))
    context = jax.random.normal(jax.random.key(1), (2, 9, 12))
    ref = make("xla")(x, context)
    # a module with the same seed has the same weights; chunk sizes are the defaults here
    np.testing.assert_allclose(make("chunked")(x, context), ref, atol=1e-5)
    qkv = [jax.random.normal(jax.random.key(i), (1, 2000, 1, 4)) for i in range(3)]
    out = attention_lib.dot_product_attention(*qkv, implementation="chunked")
    # longer than one default query chunk: several blocks, against jax's own attention
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(*qkv), atol=1e-5)


def test_unknown_implementation_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flash"):
        attention_lib.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize(
    "T, S, mask_kind, causal",
    [(77, 77, None, True), (64, 77, None, False), (37, 53, "keys", False),
     (37, 53, "full", False), (40, 64, "heads", False), (40, 64, None, False)],
)  # fmt: skip
def test_even_length_padding_changes_nothing(T, S, mask_kind, causal):
    """The cuDNN path's padding (odd lengths to even, masks broadcast to (.., T, S)), run with
    jax's XLA kernel: outputs and gradients equal unpadded attention's."""
    q, k, v = qkv(7, T=T, S=S)
    B, _, N, _ = q.shape
    rng = np.random.default_rng(1)
    mask = {
        None: None,
        "keys": np.arange(S)[None, None, None, :] < np.array([40, 17])[:, None, None, None],
        "full": rng.random((B, N, T, S)) > 0.3,
        "heads": rng.random((B, 1, T, S)) > 0.3,
    }[mask_kind]
    mask = None if mask is None else jnp.asarray(mask)

    def loss(attend, q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out  # a cotangent that differs per element

    def padded(q, k, v):
        return attention_lib.even_length_attention(q, k, v, mask, causal, implementation="xla")

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

    (_, out), grads = jax.value_and_grad(lambda *a: loss(padded, *a), (0, 1, 2), has_aux=True)(
        q, k, v
    )
    (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(plain, *a), (0, 1, 2), has_aux=True)(
        q, k, v
    )
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_cudnn_needs_half_precision():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bfloat16 or float16.*float32"):
        attention_lib.dot_product_attention(q, k, v, implementation="cudnn")


def pretend_cudnn_gpu(monkeypatch, hopper: bool):
    """What jax asks the GPU before it lowers cuDNN attention: cuDNN 9.8, and whether the GPU is
    Hopper (compute capability 9.0, as an H100) or older (as an A100)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 90800)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: hopper)


def cudnn_calls(fn, *args) -> collections.Counter:
    """cuDNN attention calls in fn lowered for CUDA (traced afresh: a new function each time)."""
    hlo = jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return collections.Counter(re.findall(r"custom_call @(__cudnn\$fmha\w*)", hlo))


def test_cudnn_falls_back_to_xla_where_it_has_no_kernel(monkeypatch, caplog):
    """Head dim 160 (the SD UNet's deepest levels) has a cuDNN kernel on Hopper, none before:
    there that attention runs as 'xla', with a warning; head dim 64 stays on cuDNN."""

    def grads(q, k, v):
        def loss(q, k, v):
            out = attention_lib.dot_product_attention(q, k, v, implementation="cudnn")
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, (0, 1, 2))(q, k, v)

    wide = [x.astype(jnp.bfloat16) for x in qkv(3, T=64, S=77, N=2, H=160)]
    narrow = [x.astype(jnp.bfloat16) for x in qkv(3, T=64, S=77, N=2, H=64)]
    pretend_cudnn_gpu(monkeypatch, hopper=True)
    assert sum(cudnn_calls(grads, *wide).values()) == 2  # forward and backward
    pretend_cudnn_gpu(monkeypatch, hopper=False)
    with caplog.at_level("WARNING"):
        assert cudnn_calls(grads, *wide) == {}
    assert "cudnn attention has no kernel" in caplog.text and "160" in caplog.text
    assert sum(cudnn_calls(grads, *narrow).values()) == 2


@pytest.mark.parametrize("stage", ["1a", "2b"])
def test_cudnn_training_step_lowers_for_cuda(stage, monkeypatch):
    """The whole jitted training step, every tower on cuDNN attention in bf16, lowers for CUDA
    (jax lowers for a platform it does not run on) with cuDNN's fused forward and backward
    kernels: jax's checks for them pass on odd lengths (the 77-token text context of the UNet's
    cross-attention, which jax 0.10's training kernel rejects unpadded; the 257-token CLIP
    sequence). jax asks the GPU for its cuDNN version and compute capability: here cuDNN 9.8 on
    a Hopper GPU (an H100). Running the kernels: test_cudnn_equals_xla_on_gpu."""
    pretend_cudnn_gpu(monkeypatch, hopper=True)
    cfg = with_attention(TINY_CAT, "cudnn", dtype="bfloat16")
    graphdef, trainable, frozen, tx, step_cfg = split_for(stage, cfg=cfg)
    state = create_state(trainable, tx, jax.random.key(0), ema=False)
    batch = {k: jnp.asarray(v) for k, v in random_batch(2).items()}

    step = lambda s, f, b: train_step(s, f, b, graphdef=graphdef, tx=tx, cfg=step_cfg)  # noqa: E731
    targets = cudnn_calls(step, state, frozen, batch)
    backward = sum(n for t, n in targets.items() if t.endswith("Backward"))
    # one forward per attention call (the frozen towers' too), one backward per trained one
    assert sum(targets.values()) - backward > backward > 0, targets


def test_full_size_step_lowers_for_cuda(monkeypatch):
    """configs/coco.py's stage-2b step at 512 px (the H100 benchmark's), every part but the VAE
    on cuDNN in bf16, lowered for CUDA from abstract arrays: on Hopper every UNet attention
    (self, adapter, text; 5 blocks at each of 4096x40, 1024x80, 256x160 queries, the mid block
    at 64x160), both CLIP towers and the inpainter use cuDNN. (Before Hopper the 160-wide heads
    fall back to 'xla': test_cudnn_falls_back_to_xla_where_it_has_no_kernel.)"""
    from bench.aot_memory import abstract_step, load_config
    from catflax import sharding as sharding_lib

    pretend_cudnn_gpu(monkeypatch, hopper=True)
    config = load_config("configs/coco.py")
    for part in ("clip_text", "clip_vision", "vae", "unet", "inpainter"):
        config.model[part].dtype = "bfloat16"
        config.model[part].attention = "xla" if part == "vae" else "cudnn"
    mesh = sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    _, step, args = abstract_step(config, mesh, global_batch=8, resolution=512)
    hlo = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(__cudnn\$fmha\w*)\([^\n]*?: \((tensor<[^,]*)", hlo)
    queries = collections.Counter(shape for target, shape in calls if "Backward" not in target)
    unet_heads = {"4096x8x40": 15, "1024x8x80": 15, "256x8x160": 15, "64x8x160": 3}
    want = {f"tensor<8x{s}xbf16>": n for s, n in unet_heads.items()}
    assert {q: n for q, n in queries.items() if q in want} == want, queries
    assert "tensor<8x78x12x64xbf16>" in queries  # CLIP text, 77 tokens padded
    assert "tensor<8x258x16x64xbf16>" in queries  # CLIP vision and inpainter, 257 padded


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason=f"cuDNN attention needs a CUDA GPU; the jax backend here is {jax.default_backend()}",
)
@pytest.mark.parametrize("T, S, causal", [(64, 64, False), (64, 77, False), (77, 77, True)])
def test_cudnn_equals_xla_on_gpu(T, S, causal):  # pragma: no cover - only on GPU machines
    """Outputs and gradients, the UNet's cross-attention shape (77 text tokens) included."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(5, T=T, S=S, H=64))

    def attend(implementation):
        def loss(q, k, v):
            out = attention_lib.dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation
            )
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = attend("xla")
    (_, out), grads = attend("cudnn")
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), atol=5e-2)


def test_flops_are_counted_with_every_attention_traced_as_xla(monkeypatch):
    """XLA's cost analysis counts `chunked`'s query-block loop body once (and kernel custom
    calls not at all); under traced_as_xla a step's FLOPs are the same whatever the attention."""
    q = jax.ShapeDtypeStruct((2, 1024, 2, 32), jnp.float32)

    def flops(implementation):
        fn = jax.jit(
            lambda q, k, v: attention_lib.dot_product_attention(
                q, k, v, implementation=implementation
            )
        )
        return fn.lower(q, q, q).cost_analysis()["flops"]

    xla = flops("xla")
    assert xla >= 2 * 2 * (2 * 1024 * 1024 * 32) * 2  # QK^T and PV, 2 flops a multiply-add
    assert flops("chunked") < 0.5 * xla  # one of four query blocks
    with attention_lib.traced_as_xla():
        assert flops("chunked") == xla
    assert flops("chunked") < 0.5 * xla  # only inside the block

    from catflax.train.steps import model_flops_per_device

    counts = {}
    for implementation in ("xla", "chunked"):
        graphdef, trainable, frozen, tx, step_cfg = split_for(
            "2b", cfg=with_attention(TINY_CAT, implementation)
        )
        state = create_state(trainable, tx, jax.random.key(0), ema=False)
        batch = {k: jnp.asarray(v) for k, v in random_batch(2).items()}
        counts[implementation] = model_flops_per_device(
            graphdef, tx, step_cfg, state, frozen, batch
        )
    assert counts["xla"] > 0 and counts["chunked"] == counts["xla"]
    # As the trainer calls it: under its mesh (a CPU one here). Backends without a cost
    # analysis before compiling (the PJRT C API: TPU, the CUDA plugin) are not used for it;
    # where even the CPU has none, None (the caller falls back to the compiled count).
    from jax._src.interpreters import pxla

    from catflax import sharding as sharding_lib

    with jax.set_mesh(sharding_lib.make_mesh(dict(data=2, fsdp=4, tensor=1))):
        assert (
            model_flops_per_device(graphdef, tx, step_cfg, state, frozen, batch)
            == counts["chunked"]
        )
    with monkeypatch.context() as patch:  # patches every backend, the CPU's too: None
        patch.setattr(pxla.xb, "using_pjrt_c_api", lambda backend: True)
        assert model_flops_per_device(graphdef, tx, step_cfg, state, frozen, batch) is None
    devices = jax.devices

    def no_cpu(backend=None):  # JAX_PLATFORMS=tpu: the CPU backend is not there
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return devices(backend)

    monkeypatch.setattr(jax, "devices", no_cpu)
    assert model_flops_per_device(graphdef, tx, step_cfg, state, frozen, batch) is None
