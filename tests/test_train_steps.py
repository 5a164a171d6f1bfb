"""The jitted training steps: sharded == single device, frozen stays frozen, a batch overfits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from catflax import sharding as sharding_lib
from catflax.models.cat import CATConfig, CATDiffusion
from catflax.models.rngs import abstract_module
from catflax.models.unet import is_adapter_param
from catflax.train import optim, stages
from catflax.train.steps import (
    StepConfig,
    create_sharded_state,
    create_state,
    jit_step,
    train_step,
)
from catflax.weights import convert
from tests.tiny import TINY_CAT, random_batch


def with_attention(cfg: CATConfig, attention: str, **fields) -> CATConfig:
    """`cfg` with every part's attention implementation set to `attention` (and `fields`)."""
    parts = ("clip_text", "clip_vision", "vae", "unet", "inpainter")
    fields["attention"] = attention
    return dataclasses.replace(
        cfg, **{p: dataclasses.replace(getattr(cfg, p), **fields) for p in parts}
    )


def split_for(stage: str, seed: int = 0, cfg: CATConfig = TINY_CAT):
    spec = stages.stage_spec(stage)
    model = CATDiffusion(cfg, rngs=nnx.Rngs(seed))
    graphdef, trainable, frozen = nnx.split(model, stages.trainable_filter(spec), ...)
    tx = optim.make_optimizer(optim.OptimizerConfig(lr_fast=1e-3, lr_slow=1e-4), trainable)
    step_cfg = StepConfig(kind=spec.step, tokens=spec.tokens, cond_dropout=0.0)
    return graphdef, trainable, frozen, tx, step_cfg


def leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def place(tree, shardings):
    flat = [(p, jax.device_put(v.get_value(), shardings[p])) for p, v in nnx.to_flat_state(tree)]
    return nnx.from_flat_state(flat)


def sharded_step(cfg, graphdef, trainable, frozen, tx, step_cfg, batch):
    """jit_step over a data x fsdp x tensor = 2 x 2 x 2 mesh, its arguments placed in their
    shardings (state, frozen, global batch), and the parameter shardings."""
    mesh = sharding_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    abstract = abstract_module(lambda rngs: CATDiffusion(cfg, rngs=rngs))
    shardings = sharding_lib.param_shardings(abstract, mesh)
    trainable_sh, frozen_sh = place(trainable, shardings), place(frozen, shardings)
    state = jax.jit(lambda p: create_state(p, tx, jax.random.key(1), ema=False))(trainable_sh)
    global_batch = sharding_lib.global_batch(batch, mesh)
    args = (state, frozen_sh, global_batch)
    step = jit_step(graphdef, tx, step_cfg, *(jax.tree.map(lambda x: x.sharding, a) for a in args))
    return step, args, shardings


@pytest.mark.parametrize("stage, attention", [("1a", "xla"), ("2b", "xla"), ("2b", "chunked")])
def test_sharded_step_equals_single_device(stage, attention):
    """("chunked": the custom-VJP attention in every part, under the mesh's shardings.)"""
    cfg = with_attention(TINY_CAT, attention)
    graphdef, trainable, frozen, _, step_cfg = split_for(stage, cfg=cfg)
    # Plain SGD with lr 1: the parameter change is the gradient itself. (Adam would amplify
    # float noise in gradients that are exactly zero in theory, such as attention key biases.)
    tx = optax.sgd(1.0)
    batch = random_batch(8)

    single = jax.jit(lambda s, f, b: train_step(s, f, b, graphdef=graphdef, tx=tx, cfg=step_cfg))
    state0 = create_state(trainable, tx, jax.random.key(1), ema=False)
    ref_state, ref_metrics = single(state0, frozen, {k: jnp.asarray(v) for k, v in batch.items()})

    step, (state, frozen_sh, global_batch), shardings = sharded_step(
        cfg, graphdef, trainable, frozen, tx, step_cfg, batch
    )
    assert any(
        s.spec != jax.sharding.PartitionSpec(*([None] * len(s.spec))) for s in shardings.values()
    )
    new_state, metrics = step(state, frozen_sh, global_batch)

    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
    for (path, a), (_, b) in zip(leaves(new_state.params), leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_adam_moments_and_ema_are_sharded_like_their_parameters():
    """The trainer's state: AdamW's mu and nu (and the EMA) in each parameter's sharding."""
    _, trainable, _, tx, _ = split_for("2b")
    mesh = sharding_lib.make_mesh(dict(data=2, fsdp=4, tensor=1))
    abstract = abstract_module(lambda rngs: CATDiffusion(TINY_CAT, rngs=rngs))
    shardings = sharding_lib.param_shardings(abstract, mesh)
    params = place(trainable, shardings)
    state = create_sharded_state(params, tx, jax.random.key(0), True, shardings, mesh)

    def named(tree):  # (names along the path, sharding) of every array
        return [
            (tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path), leaf.sharding)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if getattr(leaf, "ndim", 0) > 0
        ]

    by_path = dict(named(state.params))
    assert any(any(a is not None for a in s.spec) for s in by_path.values()), "nothing split"
    moments = named(state.opt_state)
    assert len(moments) == 2 * len(by_path)  # mu and nu of every trainable parameter
    for names, sharding in moments:
        param = next(p for p in by_path if names[-len(p) :] == p)
        assert sharding == by_path[param], (names, sharding, by_path[param])
    assert dict(named(state.ema)) == by_path


@pytest.mark.parametrize("stage", ["1a", "1b", "2a"])
def test_each_stage_trains_exactly_its_set(stage):
    """The trainable set is the stage's (frozen parts are not in the train state at all); the
    fast learning-rate group is exactly the inpainter and the UNet's reference adapter: with the
    slow rate 0, nothing else moves."""
    graphdef, trainable, frozen, _, step_cfg = split_for(stage)
    trained_parts = set(stages.stage_spec(stage).trains)
    assert {p[0] for p, _ in nnx.to_flat_state(trainable)} == trained_parts
    labels = {p: stages.lr_group(p) for p, _ in nnx.to_flat_state(trainable)}
    fast = {p for p, group in labels.items() if group == "fast"}
    expected = {p for p in labels if p[0] == "inpainter" or is_adapter_param(convert.path_str(p))}
    assert fast == expected
    assert fast < set(labels) if stage == "1b" else fast == set(labels)  # 1b: adapter only
    tx = optim.make_optimizer(optim.OptimizerConfig(lr_fast=1e-3, lr_slow=0.0), trainable)
    trainable_before = dict(nnx.to_flat_state(jax.tree.map(np.asarray, trainable)))
    step = jax.jit(lambda s, f, b: train_step(s, f, b, graphdef=graphdef, tx=tx, cfg=step_cfg))
    state = create_state(trainable, tx, jax.random.key(0), ema=False)
    batch = {k: jnp.asarray(v) for k, v in random_batch(4).items()}
    for _ in range(2):
        state, _ = step(state, frozen, batch)
    changed = {
        p for p, v in nnx.to_flat_state(state.params)
        if not np.array_equal(np.asarray(v.get_value()), trainable_before[p].get_value())
    }  # fmt: skip
    assert changed <= fast and len(changed) > 0.5 * len(fast)


def test_tiny_model_overfits_one_batch():
    graphdef, trainable, frozen, tx, step_cfg = split_for("1b")
    tx = optim.make_optimizer(optim.OptimizerConfig(lr_fast=3e-3, lr_slow=3e-3), trainable)
    step = jax.jit(lambda s, f, b: train_step(s, f, b, graphdef=graphdef, tx=tx, cfg=step_cfg))
    state = create_state(trainable, tx, jax.random.key(0), ema=False)
    batch = {k: jnp.asarray(v) for k, v in random_batch(8).items()}
    losses = []
    for _ in range(40):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last <= 0.5 * first, (first, last, losses)


class _RecordingModel:
    """Stands in for CATDiffusion in `denoise_loss`: records the prompt ids and semantic tokens
    the UNet would see (the dropout logic is what is under test, not the model)."""

    def __init__(self, batch: int):
        self.batch = batch

    def encode_latents(self, images, key):
        return jnp.zeros((self.batch, 2, 2, 4))

    def encode_text(self, ids):
        self.ids = ids
        return jnp.zeros((self.batch, ids.shape[1], 8)), jnp.zeros((self.batch, 8))

    def semantic_tokens(self, mode, batch, label):
        return jnp.ones((self.batch, 4, 8))

    def predict_noise(self, noisy, t, mask, masked_latents, context, tokens):
        self.tokens = tokens
        return noisy


@pytest.mark.parametrize("group_size", [0, 1, 4])
def test_conditioning_dropout_whole_batch_or_per_group(group_size):
    """SPEC.md: one draw for the whole batch; `group_size` (the reference's per-GPU draws): one
    draw per group. A dropped example sees the empty prompt and zero tokens, the rest their own."""
    from catflax.train.steps import denoise_loss

    B = 8
    ids = np.arange(1, B * 5 + 1, dtype=np.int32).reshape(B, 5)
    batch = dict(input_ids=jnp.asarray(ids), empty_ids=jnp.zeros((B, 5), jnp.int32),
                 image512=None, masked512=None, mask64=None)  # fmt: skip
    cfg = StepConfig(kind="denoise", tokens="inpainter", cond_dropout=0.5, group_size=group_size)
    patterns = set()
    for seed in range(24):
        model = _RecordingModel(B)
        _, aux = denoise_loss(model, batch, cfg, jax.random.key(seed))
        dropped = np.all(np.asarray(model.ids) == 0, axis=1)
        kept = np.all(np.asarray(model.ids) == ids, axis=1)
        assert np.all(dropped | kept)
        np.testing.assert_array_equal(np.all(np.asarray(model.tokens) == 0, axis=(1, 2)), dropped)
        np.testing.assert_allclose(aux["cond_dropped"], dropped.mean())
        groups = dropped.reshape(-1, group_size or B)
        assert np.all(groups == groups[:, :1])  # a group drops together
        patterns.add(tuple(groups[:, 0]))
    # 24 draws at p=0.5: both outcomes for the whole batch; groups that differ in a batch.
    if group_size == 0:
        assert patterns == {(True,), (False,)}
    else:
        assert any(len(set(p)) == 2 for p in patterns), patterns
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 8"):
        denoise_loss(_RecordingModel(B), batch, dataclasses.replace(cfg, group_size=3),
                     jax.random.key(0))  # fmt: skip


def test_ema_of_bf16_parameters_is_kept_in_float32():
    """With bf16 parameters the EMA still averages them: it is kept in float32 (a bf16 average
    at decay 0.99 barely moves), and equals the average computed on the host."""
    cfg = dataclasses.replace(
        TINY_CAT, inpainter=dataclasses.replace(TINY_CAT.inpainter, param_dtype="bfloat16")
    )
    graphdef, trainable, frozen, tx, _ = split_for("1a", cfg=cfg)
    step_cfg = StepConfig(kind="distill", ema_decay=0.99)
    step = jax.jit(lambda s, f, b: train_step(s, f, b, graphdef=graphdef, tx=tx, cfg=step_cfg))
    state = create_state(trainable, tx, jax.random.key(0), ema=True)
    batch = {k: jnp.asarray(v) for k, v in random_batch(4).items()}
    flat = lambda tree: [np.asarray(v.get_value(), np.float32) for _, v in nnx.to_flat_state(tree)]  # noqa: E731
    host = flat(state.params)
    for _ in range(10):
        state, _ = step(state, frozen, batch)
        host = [0.99 * e + 0.01 * p for e, p in zip(host, flat(state.params))]
    leaves = [v.get_value() for _, v in nnx.to_flat_state(state.ema)]
    assert {x.dtype for x in leaves} == {jnp.dtype("float32")}
    # (XLA may skip rounding the new bf16 parameters before averaging them: ~1e-4 apart.)
    for got, want in zip(flat(state.ema), host):
        np.testing.assert_allclose(got, want, atol=3e-4)
    start = flat(trainable)
    moved = sum(float(np.abs(e - p).sum()) for e, p in zip(flat(state.ema), start))
    expected = sum(float(np.abs(e - p).sum()) for e, p in zip(host, start))
    assert moved == pytest.approx(expected, rel=0.1)  # a bf16 EMA moved ~40x less


def test_parameters_left_unsplit_are_reported():
    """An fsdp size that does not divide the widths leaves kernels whole on every device: the
    trainer warns with the excess per device and the largest such parameter."""
    abstract = abstract_module(lambda rngs: CATDiffusion(TINY_CAT, rngs=rngs))
    even = sharding_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
    shardings = sharding_lib.param_shardings(abstract, even)
    assert sharding_lib.unsplit_report(abstract, shardings, None, min_bytes=0) is None
    uneven = sharding_lib.make_mesh(dict(data=1, fsdp=8, tensor=1), jax.devices()[:8])
    shardings = sharding_lib.param_shardings(abstract, uneven)  # 257 positions over 8
    report = sharding_lib.unsplit_report(abstract, shardings, None, min_bytes=0)
    assert report is not None and "GiB more per device" in report
    assert "position_embedding/embedding (257, 16) not over ['fsdp']" in report
    assert sharding_lib.unsplit_report(abstract, shardings, None) is None  # under 64 MiB: quiet
