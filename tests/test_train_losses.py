"""Every stage's training loss and gradients against the reference's computation in PyTorch
(SPEC.md §4-5): transformers CLIP, diffusers VAE and UNet with the reference adapter, the SPEC.md
inpainter, the same weights and the same random draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bench import torch_reference as ref
from bench.vs_pytorch import graphdef_for, shared_weights
from catflax.train import stages
from catflax.train.steps import LOSSES, StepConfig
from catflax.weights import convert
from tests.tiny import TINY_CAT, random_batch
from tests.torch_utils import perturb_vectors

B = 4
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(PyTorch models, our config, our parameters), the same weights; norm weights and biases
    randomised so that a swapped or skipped LayerNorm shows."""

    def prepare(tm: ref.TorchModels) -> None:
        torch.manual_seed(3)
        for module in (tm.text, tm.vision, tm.vae, tm.unet, tm.inpainter):
            perturb_vectors(module)

    return shared_weights(TINY_CAT, str(tmp_path_factory.mktemp("weights")), prepare=prepare)


def batch_with_soft_edges():
    batch = random_batch(B, seed=5)
    batch["mask16"][0] = 0  # an example with nothing masked
    return batch


# ---------------------------------------------------------------- the reference, from SPEC.md
def alphas_cumprod() -> torch.Tensor:
    """SPEC.md §5: "scaled linear" betas 0.00085 .. 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def nchw(x) -> torch.Tensor:
    """NHWC numpy/jax array -> NCHW tensor (a copy)."""
    return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2)))


def teacher(tm: ref.TorchModels, images224: np.ndarray):
    """CLIP vision of uint8 images, normalised with CLIP's mean and std."""
    pixels = (nchw(images224).float() / 255.0 - CLIP_MEAN) / CLIP_STD
    out = tm.vision(pixel_values=pixels)
    return out.last_hidden_state, out.pooler_output


def torch_denoise_loss(tm, b, tokens_mode: str, drop: bool, draws: dict) -> torch.Tensor:
    ids = torch.from_numpy(b["empty_ids" if drop else "input_ids"]).long()
    text = tm.text(input_ids=ids)
    context, label = text.last_hidden_state, text.pooler_output

    def latents_of(images, eps):  # 0.18215 x a posterior sample
        posterior = tm.vae.encode(nchw(images)).latent_dist
        return 0.18215 * (posterior.mean + posterior.std * eps)

    latents = latents_of(b["image512"], draws["eps_image"])
    masked = latents_of(b["masked512"], draws["eps_masked"])
    abar, t, noise = alphas_cumprod(), draws["t"], draws["noise"]
    noisy = abar[t].sqrt().view(-1, 1, 1, 1) * latents + (1 - abar[t]).sqrt().view(
        -1, 1, 1, 1
    ) * noise  # fmt: skip
    mask16 = torch.from_numpy(b["mask16"])
    if tokens_mode == "teacher":  # unmasked image's patches, 2x2 average-pooled on the grid
        patches = teacher(tm, b["image224"])[0][:, 1:]
        G = round(patches.shape[1] ** 0.5)
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, G, G)
        tokens = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    else:
        last, pooled = teacher(tm, b["masked224"])
        tokens = tm.inpainter(last, mask16, label, pooled)[3]
    if drop:
        tokens = torch.zeros_like(tokens)
    x = torch.cat([noisy, nchw(b["mask64"]), masked], dim=1)
    eps = tm.unet(x, t, context, cross_attention_kwargs={"ref_tokens": tokens}).sample
    return torch.nn.functional.mse_loss(eps, noise)


def torch_distill_loss(tm, b) -> torch.Tensor:
    target_last, target_pooled = teacher(tm, b["image224"])
    masked_last, masked_pooled = teacher(tm, b["masked224"])
    label = tm.text(input_ids=torch.from_numpy(b["input_ids"]).long()).pooler_output
    mask16 = torch.from_numpy(b["mask16"])
    pred_spatial, pred_global, _, _ = tm.inpainter(masked_last, mask16, label, masked_pooled)
    per_patch = ((pred_spatial - target_last[:, 1:]) ** 2).mean(-1)  # every patch (reference)
    spatial = per_patch.sum() / (mask16.sum() + 1.0)
    return spatial + ((pred_global - target_pooled) ** 2).mean()


# ---------------------------------------------------------------- ours
def our_draws(rng, latent_shape) -> dict:
    """The draws `denoise_loss` makes from its key, in torch layouts (its split order)."""
    k_image, k_masked, k_t, k_noise, _ = jax.random.split(rng, 5)
    return dict(
        eps_image=nchw(jax.random.normal(k_image, latent_shape)),
        eps_masked=nchw(jax.random.normal(k_masked, latent_shape)),
        t=torch.tensor(np.array(jax.random.randint(k_t, (B,), 0, 1000))).long(),
        noise=nchw(jax.random.normal(k_noise, latent_shape)),
    )


def our_loss_and_grads(cfg, params, stage: str, batch, step_cfg, rng):
    """The stage's loss and the gradients of its trainable parts, as {part: torch-named dict}."""
    spec = stages.stage_spec(stage)
    model = nnx.merge(graphdef_for(cfg), params)
    graphdef, trainable, frozen = nnx.split(model, stages.trainable_filter(spec), ...)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(p):
        return LOSSES[spec.step](nnx.merge(graphdef, p, frozen), jbatch, step_cfg, rng)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
    as_grads = nnx.merge(graphdef, grads, frozen)
    named = {part: convert.export_state_dict(getattr(as_grads, part)) for part in spec.trains}
    return float(loss), named


TORCH_PARTS = dict(unet="unet", inpainter="inpainter")


def compare_grads(tm, ours: dict, rtol: float, atol: float) -> None:
    for part, grads in ours.items():
        torch_params = dict(getattr(tm, TORCH_PARTS[part]).named_parameters())
        assert set(grads) == set(torch_params), part
        for name, g in grads.items():
            expected = torch_params[name].grad  # None: the loss does not depend on it
            expected = np.zeros_like(g) if expected is None else expected.numpy()
            np.testing.assert_allclose(g, expected, rtol=rtol, atol=atol, err_msg=f"{part}.{name}")


def zero_grads(tm: ref.TorchModels) -> None:
    for module in (tm.text, tm.vision, tm.vae, tm.unet, tm.inpainter):
        module.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- tests
def test_denoising_loss_and_gradients_match_the_reference(models):
    """Stage 1b (teacher tokens of the unmasked image), 2b (the inpainter's tokens of the masked
    image; 2a is the same loss with the UNet frozen), and 2b with the prompt and tokens dropped:
    the UNet input order, the VAE posterior samples, the noise schedule, the epsilon target and
    the gradients of the trained parts agree with the reference computed in PyTorch. (Ours is
    jitted: eagerly, every operation dispatched alone took twice as long.)"""
    tm, cfg, params = models
    batch = batch_with_soft_edges()
    rng = jax.random.key(7)
    latent = batch["image512"].shape[1] // 2  # the tiny VAE's factor
    draws = our_draws(rng, (B, latent, latent, cfg.vae.latent_channels))
    for stage, cond_dropout in (("1b", 0.0), ("2b", 0.0), ("2b", 1.0)):
        spec = stages.stage_spec(stage)
        step_cfg = StepConfig(kind="denoise", tokens=spec.tokens, cond_dropout=cond_dropout)
        loss, grads = our_loss_and_grads(cfg, params, stage, batch, step_cfg, rng)
        zero_grads(tm)
        expected = torch_denoise_loss(tm, batch, spec.tokens, cond_dropout == 1.0, draws)
        expected.backward()
        np.testing.assert_allclose(loss, expected.item(), rtol=1e-5, err_msg=stage)
        compare_grads(tm, grads, rtol=1e-3, atol=1e-6)


def test_distillation_loss_and_gradients_match_the_reference(models):
    """Stage 1a: the inpainter reads the masked image's CLIP features and the prompt's pooled
    text feature, and is trained toward the unmasked image's (SPEC.md §5, reference numerator)."""
    tm, cfg, params = models
    batch = batch_with_soft_edges()
    step_cfg = StepConfig(kind="distill", tokens="none", cond_dropout=0.0)
    loss, grads = our_loss_and_grads(cfg, params, "1a", batch, step_cfg, jax.random.key(0))
    zero_grads(tm)
    expected = torch_distill_loss(tm, batch)
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    compare_grads(tm, grads, rtol=1e-3, atol=1e-6)
