"""Splash (TPU Pallas) attention in interpret mode equals XLA's, on one device and on a mesh."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from catflax import sharding
from catflax.models import attention as attention_lib
from catflax.models import layers, splash
from tests.test_train_steps import sharded_step, split_for, with_attention
from tests.tiny import TINY_CAT, random_batch


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv(splash.PALLAS_INTERPRET_ENV, "1")


def qkv(seed=0, B=1, T=64, S=77, N=2, H=64):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, (B, T, N, H)),
        jax.random.normal(k2, (B, S, N, H)),
        jax.random.normal(k3, (B, S, N, H)),
    )


def value_and_grads(impl, q, k, v, **kw):
    def loss(q, k, v):
        out = attention_lib.dot_product_attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def assert_splash_equals_xla(q, k, v, **kw):
    (_, out), grads = value_and_grads("splash", q, k, v, **kw)
    (_, ref), ref_grads = value_and_grads("xla", q, k, v, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "shape, is_causal",
    [
        (dict(T=256, S=256, H=40), False),  # SD self-attention: head_dim padded 40 -> 128
        (dict(T=64, S=77, H=64), False),  # cross-attention to text: T and S padded
        (dict(T=77, S=77, H=64), True),  # CLIP text
    ],
)
def test_splash_equals_xla(interpret, shape, is_causal):
    assert_splash_equals_xla(*qkv(**shape), is_causal=is_causal)


def test_splash_key_padding_mask(interpret):
    q, k, v = qkv(1, B=2, T=77, S=77, N=1)
    lengths = np.array([77, 20])  # CLIP's attention_mask as (B,1,1,S)
    mask = jnp.asarray(np.arange(77)[None, None, None, :] < lengths[:, None, None, None])
    assert_splash_equals_xla(q, k, v, mask=mask, is_causal=True)
    full_mask = jnp.ones((2, 1, 77, 77), bool)  # per-query masks are not supported
    with pytest.raises(NotImplementedError, match="key-padding"):
        attention_lib.dot_product_attention(q, k, v, mask=full_mask, implementation="splash")


@pytest.mark.parametrize(
    "B, N, spec",
    [
        (4, 2, PartitionSpec(("data", "fsdp"), None, "tensor", None)),
        (2, 3, PartitionSpec("data", None, None, None)),  # batch 2, 3 heads: partly replicated
    ],
)
def test_splash_sharded_under_mesh(interpret, B, N, spec):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    in_sharding = NamedSharding(mesh, spec)
    q, k, v = jax.device_put(qkv(2, B=B, T=128, S=77, N=N, H=40), in_sharding)

    def step(impl):
        def f(q, k, v):
            out = attention_lib.dot_product_attention(q, k, v, implementation=impl)
            return jnp.sum(jnp.sin(out)), out

        grad_fn = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
        shardings = ((None, in_sharding), (in_sharding,) * 3)
        return jax.jit(grad_fn, in_shardings=(in_sharding,) * 3, out_shardings=shardings)

    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(step("splash"))(q, k, v)
        (_, out), grads = step("splash")(q, k, v)
    assert "shard_map" in str(jaxpr)
    (_, ref), ref_grads = step("xla")(q, k, v)
    assert out.sharding.is_equivalent_to(in_sharding, 4)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_attention_module_with_splash(interpret):
    make = lambda impl: layers.Attention(  # noqa: E731
        16, 12, 2, 8, implementation=impl, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(0), (1, 70, 16))
    context = jax.random.normal(jax.random.key(1), (1, 9, 12))
    np.testing.assert_allclose(make("splash")(x, context), make("xla")(x, context), atol=1e-5)


def test_splash_needs_tpu_or_interpret_mode(monkeypatch):
    monkeypatch.delenv(splash.PALLAS_INTERPRET_ENV, raising=False)
    if jax.default_backend() == "tpu":
        pytest.skip("splash runs natively on TPU")
    backend = jax.default_backend()
    with pytest.raises(RuntimeError, match=rf"'splash'.*backend is '{backend}'.*_PALLAS_INTERPRET"):
        attention_lib.dot_product_attention(*qkv(), implementation="splash")


def test_sharded_training_step_lowers_for_tpu(monkeypatch):
    """The whole stage-2b training step, every part on splash attention, sharded over a
    data x fsdp x tensor mesh of 8 devices, lowers for TPU with the compiled (not interpreted)
    Mosaic kernels in it: forward, dK/dV and dQ, inside shard_map. jax lowers for a platform it
    does not run on; catflax's backend check is told it runs on a TPU. Running the kernels
    needs a TPU; interpret mode checks their numbers above."""
    monkeypatch.delenv(splash.PALLAS_INTERPRET_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    cfg = with_attention(TINY_CAT, "splash")
    graphdef, trainable, frozen, tx, step_cfg = split_for("2b", cfg=cfg)
    step, args, _ = sharded_step(cfg, graphdef, trainable, frozen, tx, step_cfg, random_batch(8))
    mesh = args[0].step.sharding.mesh
    with jax.set_mesh(mesh):
        lowered = step.trace(*args).lower(lowering_platforms=("tpu",))
    hlo = lowered.as_text()
    kernels = collections.Counter(re.findall(r'kernel_name = "(\w+)"', hlo))
    for kind in ("splash_mha_fwd", "splash_mha_dkv", "splash_mha_dq"):
        assert any(name.startswith(kind) for name in kernels), (kind, kernels)
    assert "sdy.manual_computation" in hlo  # the kernels run in shard_map, per device
