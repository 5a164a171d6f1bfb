"""Schedule, q_sample and DDIM: parity with diffusers' DDIMScheduler configured as SD-1.5's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from catflax import diffusion

SHAPE = (2, 8, 8, 4)  # latents, NHWC


def sd15_scheduler() -> DDIMScheduler:
    """SD-1.5's scheduler_config.json as DDIM reads it."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).copy())


def test_alphas_cumprod_match_diffusers():
    ours = diffusion.alphas_cumprod()
    ref = sd15_scheduler().alphas_cumprod.numpy()
    assert ours.shape == ref.shape == (1000,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=0)
    np.testing.assert_allclose(diffusion.scaled_linear_betas()[[0, -1]], [0.00085, 0.012])


@pytest.mark.parametrize("num_steps", [1, 7, 20, 25, 50, 100, 333, 500])
def test_timesteps_and_alphas_match_diffusers(num_steps):
    sched = sd15_scheduler()
    sched.set_timesteps(num_steps)
    t, alpha_t, alpha_prev = diffusion.ddim_alphas(num_steps)
    np.testing.assert_array_equal(t, sched.timesteps.numpy())
    ratio = 1000 // num_steps
    ref_prev = [
        sched.alphas_cumprod[s - ratio] if s - ratio >= 0 else sched.final_alpha_cumprod
        for s in sched.timesteps.tolist()
    ]
    np.testing.assert_allclose(alpha_t, sched.alphas_cumprod.numpy()[t], rtol=2e-6)
    np.testing.assert_allclose(alpha_prev, np.array(ref_prev), rtol=2e-6)
    assert alpha_prev[-1] == diffusion.alphas_cumprod()[0]  # set_alpha_to_one=False
    if 1000 % num_steps == 0:  # the reference's make_ddim_timesteps: range(0, T, T//S) + 1
        np.testing.assert_array_equal(np.sort(t), np.arange(0, 1000, ratio) + 1)


def test_q_sample_matches_add_noise():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], np.int64)
    ours = diffusion.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    ref = sd15_scheduler().add_noise(to_torch(x0), to_torch(noise), to_torch(t))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_epsilon_loss_is_mse():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    ref = torch.nn.functional.mse_loss(to_torch(a), to_torch(b)).item()
    np.testing.assert_allclose(diffusion.epsilon_loss(jnp.asarray(a), jnp.asarray(b)), ref, 1e-6)
    per_ex = diffusion.epsilon_loss(jnp.asarray(a), jnp.asarray(b), per_example=True)
    np.testing.assert_allclose(per_ex, ((a - b) ** 2).reshape(2, -1).mean(1), rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_step_matches_diffusers(eta, num_steps):
    sched = sd15_scheduler()
    sched.set_timesteps(num_steps)
    t, alpha_t, alpha_prev = diffusion.ddim_alphas(num_steps)
    rng = np.random.default_rng(2)
    for i in (0, num_steps // 2, num_steps - 1):  # first, middle and last (alpha_prev = abar[0])
        x, eps, noise = rng.standard_normal((3, *SHAPE)).astype(np.float32)
        ours, _ = diffusion.ddim_step(
            jnp.asarray(x), jnp.asarray(eps), alpha_t[i], alpha_prev[i], eta, jnp.asarray(noise)
        )
        ref = sched.step(
            to_torch(eps), int(t[i]), to_torch(x), eta=eta, variance_noise=to_torch(noise)
        ).prev_sample
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


# A toy noise predictor, written once in jax and once in torch; `cond` is a pytree.
W = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32) * 0.5


def toy_model_jax(x, t, cond):
    h = jnp.einsum("bhwc,cd->bhwd", x, jnp.asarray(W))
    h = h + cond["shift"][:, None, None, :] * jnp.cos(t / 300.0)[:, None, None, None]
    return jnp.tanh(h) * cond["gain"][:, None, None, None]


def toy_model_torch(x, t, cond):
    h = torch.einsum("bhwc,cd->bhwd", x, torch.from_numpy(W))
    h = h + cond["shift"][:, None, None, :] * torch.cos(t / 300.0)[:, None, None, None]
    return torch.tanh(h) * cond["gain"][:, None, None, None]


def toy_conditions(rng):
    make = lambda: {  # noqa: E731
        "shift": rng.standard_normal((SHAPE[0], 4)).astype(np.float32),
        "gain": rng.uniform(0.5, 1.5, SHAPE[0]).astype(np.float32),
    }
    return make(), make()


def test_guidance_one_batched_call_equals_two_calls():
    rng = np.random.default_rng(4)
    cond, uncond = toy_conditions(rng)
    x = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    t = jnp.array([981, 981], jnp.int32)
    calls = []

    def counting_model(x, t, c):
        calls.append(x.shape[0])
        return toy_model_jax(x, t, c)

    for scale in (7.5, jnp.array([1.0, 3.0])):
        calls.clear()
        ours = diffusion.guided_eps(counting_model, x, t, cond, uncond, scale)
        assert calls == [2 * SHAPE[0]]  # one call on the doubled batch
        e_c, e_u = toy_model_jax(x, t, cond), toy_model_jax(x, t, uncond)
        scale_b = jnp.asarray(scale).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(ours, e_u + scale_b * (e_c - e_u), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        diffusion.guided_eps(toy_model_jax, x, t, cond, None, 7.5), toy_model_jax(x, t, cond)
    )
    with pytest.raises(ValueError, match="same structure"):
        diffusion.guided_eps(toy_model_jax, x, t, cond, {"shift": cond["shift"]}, 7.5)


@pytest.mark.parametrize("eta,num_steps", [(0.0, 50), (1.0, 20)])
def test_sampler_matches_diffusers_loop(eta, num_steps):
    rng = np.random.default_rng(5)
    cond, uncond = toy_conditions(rng)
    key, scale = jax.random.key(7), 7.5
    ours = diffusion.ddim_sample(
        toy_model_jax, cond, uncond, key=key, shape=SHAPE, num_steps=num_steps,
        guidance_scale=scale, eta=eta,
    )  # fmt: skip

    sched = sd15_scheduler()
    sched.set_timesteps(num_steps)
    x = to_torch(diffusion.initial_noise(key, SHAPE))
    tc = {k: to_torch(v) for k, v in cond.items()}
    tu = {k: to_torch(v) for k, v in uncond.items()}
    for i, t in enumerate(sched.timesteps):
        t_b = torch.full((SHAPE[0],), float(t))
        e_c, e_u = toy_model_torch(x, t_b, tc), toy_model_torch(x, t_b, tu)
        noise = to_torch(diffusion.step_noise(key, i, SHAPE)) if eta > 0 else None
        x = sched.step(e_u + scale * (e_c - e_u), t, x, eta=eta, variance_noise=noise).prev_sample
    # Guidance 7.5 drives the toy latents to |x| ~ 100: compare relative to that scale.
    scale_x = np.abs(x.numpy()).max()
    err = np.abs(np.asarray(ours) - x.numpy()).max() / scale_x
    print(f"ddim eta={eta} steps={num_steps}: max |ours - diffusers| / max|x| = {err:.1e}")
    assert err < 1e-5


def test_sampler_is_deterministic_and_takes_x_T():
    rng = np.random.default_rng(6)
    cond, _ = toy_conditions(rng)
    kw = dict(key=jax.random.key(0), shape=SHAPE, num_steps=5, eta=0.5)
    a = diffusion.ddim_sample(toy_model_jax, cond, **kw)
    b = diffusion.ddim_sample(toy_model_jax, cond, **kw)
    np.testing.assert_array_equal(a, b)
    x_T = diffusion.initial_noise(kw["key"], SHAPE)
    np.testing.assert_array_equal(diffusion.ddim_sample(toy_model_jax, cond, x_T=x_T, **kw), a)
    # The whole loop is one scan with the model traced once inside it.
    sample = functools.partial(diffusion.ddim_sample, toy_model_jax, cond, cond, **kw)
    jaxpr = str(jax.make_jaxpr(sample)())
    assert jaxpr.count("scan[") == 1 and jaxpr.count("tanh") == 1
    for bad in (0, 1000):  # 1000 steps would need timestep 1000 (offset 1)
        with pytest.raises(ValueError, match="num_steps"):
            diffusion.ddim_timesteps(bad)


def test_eta_is_traced():
    """A new eta value reuses the compilation; an array eta equals the same Python eta."""
    rng = np.random.default_rng(8)
    cond, _ = toy_conditions(rng)
    kw = dict(key=jax.random.key(3), shape=SHAPE, num_steps=4)
    before = diffusion._ddim_sample._cache_size()
    a = diffusion.ddim_sample(toy_model_jax, cond, eta=0.3, **kw)
    b = diffusion.ddim_sample(toy_model_jax, cond, eta=0.7, **kw)
    assert diffusion._ddim_sample._cache_size() == before + 1
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    traced = diffusion.ddim_sample(toy_model_jax, cond, eta=jnp.float32(0.7), **kw)
    np.testing.assert_allclose(traced, b, rtol=1e-6, atol=1e-6)
    # eta 0: no noise drawn (its own compilation), equal to an array 0 that draws it times 0.
    zero = diffusion.ddim_sample(toy_model_jax, cond, eta=0.0, **kw)
    np.testing.assert_allclose(
        diffusion.ddim_sample(toy_model_jax, cond, eta=jnp.float32(0.0), **kw), zero, atol=1e-6
    )
    # stochastic=False is deterministic DDIM whatever the (unchecked, traced) eta says.
    plain = diffusion.ddim_sample(toy_model_jax, cond, eta=jnp.float32(0.5), stochastic=False, **kw)
    np.testing.assert_allclose(plain, zero, atol=1e-6)
    with pytest.raises(ValueError, match="stochastic=True"):
        diffusion.ddim_sample(toy_model_jax, cond, eta=0.5, stochastic=False, **kw)
