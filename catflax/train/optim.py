"""AdamW with the per-stage parameter groups of SPEC.md §5, clipping, warmup, and stage 1a's
reduce-on-plateau learning rate."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from catflax.train.stages import lr_group


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr_fast: float = 1e-4  # inpainter and reference adapter
    lr_slow: float = 1e-5  # the rest of the UNet
    warmup_steps: int = 0
    weight_decay: float = 1e-2  # torch.optim.AdamW's default, as in the reference
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 0.0  # global-norm clipping; 0: off (the reference does not clip)
    reduce_on_plateau: bool = False  # scale every update by PlateauState.scale (stage 1a)


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
    """torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold_mode="rel", cooldown=0)."""

    factor: float = 0.1  # the learning rates are multiplied by this on a plateau
    patience: int = 2  # validations without improvement that are tolerated
    threshold: float = 1e-4  # improvement: loss < best * (1 - threshold)


def schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    if warmup_steps <= 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
        [warmup_steps],
    )


def learning_rate(peak: float, warmup_steps: int, count: int) -> float:
    """`schedule(peak, warmup_steps)` at update `count`, on the host (no device round trip)."""
    if warmup_steps <= 0:
        return float(peak)
    return float(peak) * min(count, warmup_steps) / warmup_steps


def param_labels(params: nnx.State) -> nnx.State:
    """A state of the same structure holding each parameter's learning-rate group."""
    return nnx.from_flat_state([(p, lr_group(p)) for p, _ in nnx.to_flat_state(params)])


def make_optimizer(cfg: OptimizerConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW per group (fast/slow; groups from parameter paths), after global-norm clipping if
    grad_clip_norm > 0; with `reduce_on_plateau`, every update (AdamW's weight decay included)
    is then scaled."""

    def adamw(lr):
        return optax.adamw(
            schedule(lr, cfg.warmup_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip

    labels = param_labels(params)
    tx = optax.multi_transform({"fast": adamw(cfg.lr_fast), "slow": adamw(cfg.lr_slow)}, labels)
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    if cfg.reduce_on_plateau:
        tx = optax.chain(tx, scale_by_plateau())
    return tx


# ---------------------------------------------------------------------------------------------
# Reduce-on-plateau (SPEC.md §5: stage 1a, on the validation loss, factor 0.1, patience 2)
# ---------------------------------------------------------------------------------------------
class PlateauState(NamedTuple):
    """Part of the optimiser state, so checkpoints carry it."""

    scale: jax.Array  # multiplies every update: the learning rates' factor so far
    best: jax.Array  # the lowest validation loss seen
    bad_validations: jax.Array  # validations since `best` last improved (int32)


def scale_by_plateau() -> optax.GradientTransformation:
    """Multiplies updates by the state's scale; `observe_validation_loss` moves the scale."""

    def init(params):
        del params
        return PlateauState(jnp.ones((), jnp.float32), jnp.full((), jnp.inf, jnp.float32),
                            jnp.zeros((), jnp.int32))  # fmt: skip

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: (state.scale * u).astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def observe_validation_loss(state: PlateauState, loss, cfg: PlateauConfig) -> PlateauState:
    """ReduceLROnPlateau.step(loss): after more than `patience` validations without a relative
    improvement of `threshold`, the scale drops by `factor` and the count restarts. (PyTorch also
    skips reductions smaller than eps=1e-8 in absolute learning rate; that is not modelled.)"""
    loss = jnp.asarray(loss, jnp.float32)
    improved = loss < state.best * (1.0 - cfg.threshold)
    bad = jnp.where(improved, 0, state.bad_validations + 1)
    reduce = bad > cfg.patience
    return PlateauState(
        scale=jnp.where(reduce, state.scale * cfg.factor, state.scale),
        best=jnp.where(improved, loss, state.best),
        bad_validations=jnp.where(reduce, 0, bad).astype(jnp.int32),
    )


def _is_plateau(x) -> bool:
    return isinstance(x, PlateauState)


def plateau_state(opt_state) -> PlateauState | None:
    """The PlateauState inside an optimiser state, or None without reduce-on-plateau."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(x)]
    return found[0] if found else None


def with_plateau_state(opt_state, new: PlateauState):
    """`opt_state` with its PlateauState replaced by `new`."""
    return jax.tree.map(lambda x: new if _is_plateau(x) else x, opt_state, is_leaf=_is_plateau)
