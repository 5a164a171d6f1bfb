"""AdamW with the per-stage parameter groups of SPEC.md §5, clipping and warmup."""

from __future__ import annotations

import dataclasses

import jax
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
    grad_clip_norm: float = 1.0  # 0 disables clipping


def schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    if warmup_steps <= 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
        [warmup_steps],
    )


def param_labels(params: nnx.State) -> nnx.State:
    """A state of the same structure holding each parameter's learning-rate group."""
    return nnx.from_flat_state([(p, lr_group(p)) for p, _ in nnx.to_flat_state(params)])


def make_optimizer(cfg: OptimizerConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW per group (fast/slow), after global-norm clipping; groups from parameter paths."""

    def adamw(lr):
        return optax.adamw(
            schedule(lr, cfg.warmup_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip

    labels = param_labels(params)
    tx = optax.multi_transform({"fast": adamw(cfg.lr_fast), "slow": adamw(cfg.lr_slow)}, labels)
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def current_lrs(cfg: OptimizerConfig, step: jax.Array) -> dict[str, jax.Array]:
    return {
        "lr_fast": schedule(cfg.lr_fast, cfg.warmup_steps)(step),
        "lr_slow": schedule(cfg.lr_slow, cfg.warmup_steps)(step),
    }
