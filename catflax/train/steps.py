"""The two pure training steps: `distill_step` (stage 1a) and `denoise_step` (1b, 2a, 2b).

Each takes the train state (trainable parameters, optimiser state, EMA, rng), the frozen
parameters and a global batch, merges them into a CATDiffusion inside the step, and returns the
new state and on-device metrics. Jit them with `jit_step` (explicit shardings, state donated).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec
from optax.transforms import _masking

from catflax import diffusion
from catflax.models import inpainter as inpainter_lib
from catflax.train import optim

# A batch entry (one int32 per example) that each process sets to 1 once it got a preemption
# notice (SIGTERM); the step returns its max, so all processes learn of a notice to any one of
# them at the same step and checkpoint together.
PREEMPT_KEY = "preempt"


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # the stage's trainable parameters
    opt_state: optax.OptState
    ema: nnx.State | None  # EMA of `params`, when enabled
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step computes, beside the model itself."""

    kind: str  # "distill" | "denoise"
    tokens: str = "none"  # semantic tokens for the UNet: "teacher" | "inpainter"
    cond_dropout: float = 0.1  # p of dropping prompt and tokens for the whole batch
    masked_numerator: bool = False  # distillation loss on masked patches only (paper variant)
    # Examples per reference GPU: dropout drawn and the distillation loss normalised per group
    # of this many examples, as the reference's data-parallel GPUs did; 0: the whole batch.
    group_size: int = 0
    ema_decay: float = 0.0  # 0 = no EMA


def ema_copy(param: jax.Array) -> jax.Array:
    """A parameter's EMA starts as a float32 copy of it: a bf16 average would barely move
    (increments of (1 - decay) x the update fall below bf16's resolution)."""
    if jnp.issubdtype(param.dtype, jnp.floating):
        return jnp.array(param, dtype=jnp.float32)
    return jnp.copy(param)


def create_state(params: nnx.State, tx: optax.GradientTransformation, rng, ema: bool):
    """A fresh TrainState (unsharded: see `create_sharded_state`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(ema_copy, params) if ema else None,
        rng=rng,
    )


def distill_loss(model, batch: dict[str, jax.Array], cfg: StepConfig, rng, weights_B=None):
    """SPEC.md §5 distillation: inpainter(masked features) vs teacher features of the image."""
    del rng
    masked_last, masked_pooled = model.teacher(batch["masked224"])
    target_last, target_pooled = model.teacher(batch["image224"])
    _, label = model.encode_text(batch["input_ids"])
    out = model.inpainter(masked_last, batch["mask16"], label, masked_pooled)
    return inpainter_lib.distillation_loss(
        out, target_last, target_pooled, batch["mask16"], masked_only=cfg.masked_numerator,
        weights_B=weights_B, group_size=0 if weights_B is not None else cfg.group_size,
    )  # fmt: skip


def denoise_loss(model, batch: dict[str, jax.Array], cfg: StepConfig, rng):
    """SPEC.md §5 diffusion loss: epsilon MSE with conditioning dropout for the whole batch (or
    per group of `cfg.group_size` examples)."""
    k_latent, k_masked, k_t, k_noise, k_drop = jax.random.split(rng, 5)
    latents = model.encode_latents(batch["image512"], k_latent)
    masked_latents = model.encode_latents(batch["masked512"], k_masked)
    B = latents.shape[0]
    t = diffusion.sample_timesteps(k_t, B)
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    noisy = diffusion.q_sample(latents, t, noise)

    groups = inpainter_lib.split_groups(B, cfg.group_size) if cfg.group_size else 1
    drop_B = jnp.repeat(jax.random.uniform(k_drop, (groups,)) < cfg.cond_dropout, B // groups)
    ids = jnp.where(drop_B[:, None], batch["empty_ids"], batch["input_ids"])
    context, label = model.encode_text(ids)
    tokens = model.semantic_tokens(cfg.tokens, batch, label)
    tokens = jnp.where(drop_B[:, None, None], jnp.zeros_like(tokens), tokens)
    eps = model.predict_noise(noisy, t, batch["mask64"], masked_latents, context, tokens)
    loss = diffusion.epsilon_loss(eps, noise)
    return loss, {"denoise_loss": loss, "cond_dropped": jnp.mean(drop_B.astype(jnp.float32))}


LOSSES = {"distill": distill_loss, "denoise": denoise_loss}


def train_step(
    state: TrainState,
    frozen: nnx.State,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step of the stage's loss; frozen parameters get no gradient."""
    rng, step_rng = jax.random.split(state.rng)
    step_rng = jax.random.fold_in(step_rng, state.step)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, frozen)
        return LOSSES[cfg.kind](model, batch, cfg, step_rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), ema, params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    if PREEMPT_KEY in batch:  # the max over the global batch: every process sees any notice
        metrics[PREEMPT_KEY] = jnp.max(batch[PREEMPT_KEY])
    plateau = optim.plateau_state(state.opt_state)
    if plateau is not None:  # the factor this step's update was scaled by
        metrics["lr_scale"] = plateau.scale
    new_state = TrainState(state.step + 1, params, opt_state, ema, rng)
    return new_state, metrics


def jit_step(graphdef, tx, cfg: StepConfig, state_sharding, frozen_sharding, batch_sharding):
    """`train_step` jitted with explicit in/out shardings and the train state donated."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg)
    return jax.jit(
        fn,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )


def model_flops_per_device(
    graphdef, tx, cfg: StepConfig, state, frozen, batch
) -> float | None:  # fmt: skip
    """FLOPs of one training step, whole batch, divided by the device count: XLA's cost
    analysis of the step before partitioning, with every attention traced as `xla` (the
    compiled program's own count misses what runs in loops or kernel custom calls). Remat's
    recomputation, where on, is included. The step is lowered for one CPU device from shapes
    alone (TPU and CUDA-plugin backends have no pre-compilation cost analysis); None where
    that is impossible (e.g. no CPU backend) or XLA gives no count."""
    from catflax.models.attention import traced_as_xla

    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen, batch))
    try:  # no CPU backend (JAX_PLATFORMS=tpu), or XLA refuses: no count, training goes on
        cpu = jax.devices("cpu")[0]
        one_cpu = jax.sharding.Mesh(np.asarray([cpu]), ("flops",))
        # A new jit object: nothing traced outside this block is reused, nor this trace later.
        with traced_as_xla(), jax.set_mesh(one_cpu), jax.default_device(cpu):
            fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg))
            cost = fn.lower(*shapes).cost_analysis()
    except Exception as e:
        logging.warning("no FLOP count of the lowered step (%s: %s)", type(e).__name__, e)
        return None
    flops = _flops(cost)
    return None if flops is None else flops / jax.device_count()


def _flops(cost) -> float | None:
    """The "flops" entry of an XLA cost analysis (a dict, a list of one, or None)."""
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, per device (XLA counts the partitioned
    program: a step sharded N ways reports 1/N of the global count); 0 where none."""
    return _flops(compiled.cost_analysis()) or 0.0


def step_flops_per_device(compiled, graphdef, tx, cfg: StepConfig, state, frozen, batch) -> float:
    """`model_flops_per_device`, else (with a warning) the compiled step's own count, which
    misses attention run in loops or kernels."""
    flops = model_flops_per_device(graphdef, tx, cfg, state, frozen, batch)
    if flops is None:
        logging.warning("FLOPs from the compiled step's count, which misses attention run in "
                        "loops or kernels")  # fmt: skip
        flops = compiled_flops(compiled)
    return flops


def validation_loss(
    params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *,
    graphdef: nnx.GraphDef, cfg: StepConfig,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(loss x valid examples, valid examples) of one validation batch: the stage's loss on
    `batch["valid"]` examples only (padding weighs nothing). Stage 1a's loss has no randomness."""
    if cfg.kind != "distill":
        raise ValueError(
            f"a validation loss is defined for the distillation stage only, not {cfg.kind!r}"
        )
    model = nnx.merge(graphdef, params, frozen)
    valid_B = batch["valid"].astype(jnp.float32)
    loss, _ = distill_loss(model, batch, cfg, None, weights_B=valid_B)
    count = valid_B.sum()
    return loss * count, count


def jit_validation(graphdef, cfg: StepConfig):
    """`validation_loss` jitted (inputs keep their shardings; outputs are replicated)."""
    return jax.jit(functools.partial(validation_loss, graphdef=graphdef, cfg=cfg))


def sharding_of(tree: Any) -> Any:
    """The shardings of a tree of arrays (for in/out shardings that keep a layout)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def param_tree_shardings(params: nnx.State, shardings: Mapping[tuple, Any]) -> Any:
    """A tree shaped like `params` (Variables and all) holding each parameter's sharding."""
    flat = [shardings[path] for path, _ in nnx.to_flat_state(params)]
    return jax.tree.unflatten(jax.tree.structure(params), flat)


def state_shardings(params: nnx.State, tx, shardings: Mapping[tuple, Any], mesh, ema: bool):
    """Shardings of the TrainState for `params`: AdamW moments (and the EMA) sharded exactly like
    their parameters, step counters and the rng replicated."""
    params_sh = param_tree_shardings(params, shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda p: create_state(p, tx, jax.random.key(0), ema), params)
    opt_sh = optax.tree_utils.tree_map_params(
        tx,
        lambda leaf, s: leaf if isinstance(leaf, _masking.MaskedNode) else s,
        abstract.opt_state,
        params_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable | _masking.MaskedNode),
    )
    return abstract.replace(
        step=replicated, params=params_sh, opt_state=opt_sh,
        ema=params_sh if ema else None, rng=replicated,
    )  # fmt: skip


def create_sharded_state(params: nnx.State, tx, rng, ema: bool, shardings, mesh) -> TrainState:
    """`create_state` with every array in its sharding. (Under a plain jit the moments come out
    replicated: `zeros_like` does not read its input, so nothing carries the sharding over.)"""
    out = state_shardings(params, tx, shardings, mesh, ema)
    return jax.jit(lambda p, r: create_state(p, tx, r, ema), out_shardings=out)(params, rng)
