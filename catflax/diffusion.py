"""Noise schedule, q_sample, epsilon loss and DDIM sampling with classifier-free guidance.

The schedule is SD-1.5's (SPEC.md §5): 1000 steps, betas linear in sqrt from 0.00085 to 0.012.
DDIM is diffusers' `DDIMScheduler` configured as SD-1.5's (`timestep_spacing="leading"`,
`steps_offset=1`, `set_alpha_to_one=False`): timesteps `k * (1000 // S) + 1` for k = S-1..0,
and the last step's alpha_prev is alphas_cumprod[0]. That is the reference's sampler exactly
when S divides 1000 (50, 20, ...); for other S the reference runs extra steps (and fails for
S > 333), this runs S.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (x_t, t (B,) int32, cond) -> eps


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A "scaled linear" beta schedule; defaults are SD-1.5's."""

    num_train_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1  # DDIM: added to every sampling timestep


SD15_SCHEDULE = ScheduleConfig()


def scaled_linear_betas(schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """Betas (T,) float64: linspace(sqrt(start), sqrt(end), T) ** 2."""
    s = schedule
    return np.linspace(s.beta_start**0.5, s.beta_end**0.5, s.num_train_steps) ** 2


def alphas_cumprod(schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """prod_{s<=t} (1 - beta_s), (T,) float32 (computed in float64, as the reference does)."""
    return np.cumprod(1.0 - scaled_linear_betas(schedule)).astype(np.float32)


def _per_example(values_B: jax.Array, like: jax.Array) -> jax.Array:
    return values_B.reshape(values_B.shape[0], *([1] * (like.ndim - 1)))


def q_sample(
    x0: jax.Array, t_B: jax.Array, noise: jax.Array, schedule: ScheduleConfig = SD15_SCHEDULE
) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for integer timesteps t (B,)."""
    abar = _per_example(jnp.asarray(alphas_cumprod(schedule))[t_B], x0)
    return (jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise).astype(x0.dtype)


def sample_timesteps(
    key: jax.Array, batch: int, schedule: ScheduleConfig = SD15_SCHEDULE
) -> jax.Array:
    """Uniform training timesteps in [0, T), (B,) int32."""
    return jax.random.randint(key, (batch,), 0, schedule.num_train_steps, dtype=jnp.int32)


def epsilon_loss(eps_pred: jax.Array, noise: jax.Array, per_example: bool = False) -> jax.Array:
    """Plain MSE between predicted and true noise (float32); per example (B,) or the batch mean."""
    sq = (eps_pred.astype(jnp.float32) - noise.astype(jnp.float32)) ** 2
    per_ex = sq.reshape(sq.shape[0], -1).mean(axis=1)
    return per_ex if per_example else per_ex.mean()


# ---------------------------------------------------------------------- DDIM
def ddim_timesteps(num_steps: int, schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """The S sampling timesteps, descending: k * (T // S) + offset for k = S-1..0."""
    T = schedule.num_train_steps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps} must be in [1, {T}]")
    t = np.arange(num_steps)[::-1] * (T // num_steps) + schedule.steps_offset
    if t[0] >= T:
        raise ValueError(
            f"num_steps={num_steps}: its first timestep {t[0]} is past the schedule's last "
            f"({T - 1}); use fewer steps"
        )
    return t.astype(np.int32)


def ddim_alphas(
    num_steps: int, schedule: ScheduleConfig = SD15_SCHEDULE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, alpha_t, alpha_prev), each (S,), in sampling order; alpha_prev of the last
    step (t - T//S < 0) is alphas_cumprod[0]."""
    abar = alphas_cumprod(schedule)
    t = ddim_timesteps(num_steps, schedule)
    prev = t - schedule.num_train_steps // num_steps
    alpha_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], abar[0])
    return t, abar[t], alpha_prev.astype(np.float32)


def ddim_step(
    x_t: jax.Array,
    eps: jax.Array,
    alpha_t: jax.Array,
    alpha_prev: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update (Song et al. eq. 12): returns (x_prev, predicted x0). `noise` is added
    (times sigma, which is 0 for eta 0) when given; a Python eta > 0 requires it."""
    pred_x0 = (x_t - jnp.sqrt(1.0 - alpha_t) * eps) / jnp.sqrt(alpha_t)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    sigma = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(alpha_prev) * pred_x0 + jnp.sqrt(1.0 - alpha_prev - sigma**2) * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    elif isinstance(eta, int | float) and eta > 0:
        raise ValueError("ddim_step: eta > 0 needs noise")
    return x_prev.astype(x_t.dtype), pred_x0


def guided_eps(
    model_fn: ModelFn,
    x_t: jax.Array,
    t_B: jax.Array,
    cond: Any,
    uncond: Any | None,
    guidance_scale: float | jax.Array,
) -> jax.Array:
    """Classifier-free guidance, both branches in ONE model call on a 2B batch [uncond; cond]:
    eps_u + scale * (eps_c - eps_u). `guidance_scale` is a scalar or per example (B,)."""
    if uncond is None:
        return model_fn(x_t, t_B, cond).astype(x_t.dtype)
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(
            "guided_eps: cond and uncond must have the same structure, got "
            f"{jax.tree.structure(cond)} and {jax.tree.structure(uncond)}"
        )
    both = jax.tree.map(lambda c, u: jnp.concatenate([u, c], axis=0), cond, uncond)
    eps_both = model_fn(
        jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t_B, t_B], axis=0), both
    ).astype(x_t.dtype)
    eps_u, eps_c = jnp.split(eps_both, 2, axis=0)
    scale = jnp.asarray(guidance_scale, x_t.dtype)
    if scale.ndim == 1:
        scale = _per_example(scale, x_t)
    return eps_u + scale * (eps_c - eps_u)


def initial_noise(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """x_T that `ddim_sample` draws from `key`."""
    return jax.random.normal(jax.random.split(key)[0], shape, dtype)


def step_noise(key: jax.Array, step: int | jax.Array, shape: tuple[int, ...], dtype=jnp.float32):
    """The noise `ddim_sample` adds at sampling step `step` (0 = first) when stochastic."""
    return jax.random.normal(jax.random.fold_in(jax.random.split(key)[1], step), shape, dtype)


def ddim_sample(
    model_fn: ModelFn,
    cond: Any,
    uncond: Any | None = None,
    *,
    key: jax.Array,
    shape: tuple[int, ...],
    num_steps: int = 50,
    guidance_scale: float | jax.Array = 7.5,
    eta: float | jax.Array = 0.0,
    stochastic: bool | None = None,
    schedule: ScheduleConfig = SD15_SCHEDULE,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """DDIM from x_T (drawn from `key` unless given) to x_0, one jitted `lax.fori_loop`.

    `key` is one key for the batch, or one per example (a (B,) typed key array or (B, 2) raw
    uint32 keys): then x_T and the per-step noise (eta > 0) of example b come from key b alone,
    as in a call with batch 1.
    `model_fn(x_t, t, cond) -> eps` sees a 2B batch (uncond then cond) when `uncond` is given.
    It is a static argument: pass the same callable to reuse the compilation, and do not close
    over large arrays (call this inside your own jit with the model as its argument instead).
    `eta` is traced (a new value does not recompile); `stochastic` (static) says whether the
    per-step noise is drawn at all: by default `eta > 0` for a Python number, True for an array.
    """
    if stochastic is None:
        stochastic = not isinstance(eta, int | float) or eta > 0
    elif not stochastic and isinstance(eta, int | float) and eta > 0:
        raise ValueError(f"ddim_sample: eta={eta} needs stochastic=True")
    return _ddim_sample(
        model_fn, cond, uncond, key=key, shape=tuple(shape), num_steps=num_steps,
        guidance_scale=guidance_scale, eta=eta, stochastic=bool(stochastic), schedule=schedule,
        x_T=x_T,
    )  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("model_fn", "shape", "num_steps", "stochastic", "schedule")
)
def _ddim_sample(
    model_fn, cond, uncond, *, key, shape, num_steps, guidance_scale, eta, stochastic, schedule,
    x_T,
):  # fmt: skip
    timesteps, alpha_t, alpha_prev = (jnp.asarray(a) for a in ddim_alphas(num_steps, schedule))

    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)  # else a raw uint32 (.., 2) key

    def per_key(draw, *args):  # draw(key, *args, shape) for the batch, or per example key
        if key.ndim == (0 if typed else 1):
            return draw(key, *args, tuple(shape))
        if key.shape[0] != shape[0]:
            raise ValueError(f"ddim_sample: {key.shape[0]} keys for a batch of {shape[0]}")
        one = (1, *shape[1:])
        return jax.vmap(lambda k: draw(k, *args, one))(key).reshape(shape)

    x = per_key(initial_noise) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if x.shape != tuple(shape):
        raise ValueError(f"ddim_sample: x_T has shape {x.shape}, expected {tuple(shape)}")

    def body(i, x):
        t_B = jnp.full((x.shape[0],), timesteps[i], jnp.int32)
        eps = guided_eps(model_fn, x, t_B, cond, uncond, guidance_scale)
        noise = per_key(step_noise, i).astype(x.dtype) if stochastic else None
        # not stochastic: deterministic DDIM whatever `eta` (an array eta cannot be checked)
        x_prev, _ = ddim_step(x, eps, alpha_t[i], alpha_prev[i], eta if stochastic else 0.0, noise)
        return x_prev

    return jax.lax.fori_loop(0, num_steps, body, x)
