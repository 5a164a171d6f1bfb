"""The optimiser: stage 1a's reduce-on-plateau against PyTorch's ReduceLROnPlateau, and its scale
applied to every update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from catflax.train import optim


@pytest.mark.parametrize(("patience", "threshold"), [(2, 1e-4), (0, 1e-4), (1, 0.3)])
def test_plateau_matches_torch(patience, threshold):
    rng = np.random.default_rng(patience)
    # A descending then flat random walk, with steps just above and below the relative threshold.
    losses = list(np.cumsum(rng.uniform(-0.2, 0.05, 30)) + 10.0)
    losses += [losses[-1] * (1 - threshold * 1.01), losses[-1] * (1 - threshold * 0.99)] * 3
    losses += [float("nan"), 1.0, 1.0, 1.0, 1.0]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.1, patience=patience, threshold=threshold, eps=0.0
    )
    cfg = optim.PlateauConfig(factor=0.1, patience=patience, threshold=threshold)
    state = optim.scale_by_plateau().init(None)
    observe = jax.jit(optim.observe_validation_loss, static_argnums=2)
    scales = []
    for i, loss in enumerate(losses):
        sched.step(loss)
        state = observe(state, np.float32(loss), cfg)
        scales.append(float(state.scale))
        np.testing.assert_allclose(float(state.scale), opt.param_groups[0]["lr"], rtol=1e-6,
                                   err_msg=f"after validation {i}")  # fmt: skip
    assert min(scales) < 1.0  # the sequence does reduce


def test_plateau_scale_multiplies_every_update():
    params = nnx.State({"inpainter": {"w": nnx.Param(jnp.ones((3, 2)))},
                        "unet": {"w": nnx.Param(jnp.ones((2,)))}})  # fmt: skip
    grads = jax.tree.map(lambda p: p * 0.5, params)
    cfg = optim.OptimizerConfig(lr_fast=1e-2, lr_slow=1e-3, reduce_on_plateau=True)
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    plateau = optim.plateau_state(state)
    assert (
        float(plateau.scale) == 1.0
        and optim.plateau_state(optim.make_optimizer(optim.OptimizerConfig(), params).init(params))
        is None
    )
    full, _ = tx.update(grads, state, params)
    reduced_state = optim.with_plateau_state(state, plateau._replace(scale=jnp.float32(0.1)))
    reduced, new_state = tx.update(grads, reduced_state, params)
    assert float(optim.plateau_state(new_state).scale) == pytest.approx(0.1)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(reduced)):
        np.testing.assert_allclose(b, 0.1 * a, rtol=1e-6)  # AdamW and its weight decay


def test_host_learning_rate_equals_the_schedule():
    """The trainer logs rates computed on the host: they must be the optimiser's own."""
    for warmup in (0, 1, 7):
        sched = optim.schedule(3e-4, warmup)
        for count in (0, 1, 3, 6, 7, 8, 100):
            expected = float(sched(count))
            assert optim.learning_rate(3e-4, warmup, count) == pytest.approx(expected, rel=1e-6)
