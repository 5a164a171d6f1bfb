"""The 50-step DDIM + CFG loop of one UNet: ours (one jitted `lax.fori_loop`) against PyTorch's.

    python bench/sampling_vs_pytorch.py --config=configs/demo.py --batch_sizes=1,4  # CPU: fp32
    python bench/sampling_vs_pytorch.py --config=configs/coco.py --batch_sizes=1 \\
        --config.model.unet.dtype=bfloat16 --config.model.unet.attention=cudnn  # GPU: torch fp16

PyTorch: diffusers' UNet2DConditionModel of the config's UNet sizes with the SPEC.md §2 reference
adapter (bench/torch_reference.py), default init, eager, its default (SDPA) attention, one
2B-batch UNet call per step for the two guidance branches, catflax's DDIM timesteps and alphas;
`--torch_dtype` (default float16 on a CUDA GPU, float32 otherwise). Ours: the same weights
loaded with `UNet.from_pretrained`, `catflax.diffusion.ddim_sample` in one jit, compute dtype and
attention from the config. Only the denoising loop is timed (conditioning ready on the device;
the text, vision, inpainter and VAE work of a whole sample is in bench/sampling.py), median of
`--repeats` loops after a warm-up. With both sides in fp32 the final latents must agree, which
makes this a parity check of the whole guided loop as well (`max_abs_diff`).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx

from bench import common, sampling
from bench import torch_reference as ref
from catflax import diffusion
from catflax.models.cat import CATConfig
from catflax.models.unet import UNet
from catflax.weights import convert

FLAGS: dict = {}  # set by define_flags() when run as a script


# ============================================================================ the two UNets
def shared_unets(cat_cfg: CATConfig, workdir: str, seed: int, torch_dtype, device):
    """(PyTorch UNet with adapter on `device` in `torch_dtype`, ours) from the same weights."""
    u = cat_cfg.unet
    torch.manual_seed(seed)
    torch_unet = ref.build_unet(u).eval()
    torch_unet.save_pretrained(os.path.join(workdir, "unet"))
    ours = UNet.from_pretrained(workdir, init_missing_adapter=True, ref_dim=u.ref_dim, seed=seed,
                                dtype=u.dtype, attention=u.attention)  # fmt: skip
    ref.add_reference_adapter(torch_unet, u.ref_dim)
    ref.load_numpy_state(torch_unet, convert.export_state_dict(ours))  # the adapter: ours -> torch
    return torch_unet.to(device=device, dtype=torch_dtype), ours


def random_conditioning(cat_cfg: CATConfig, batch: int, latent: int, seed: int):
    """NHWC numpy arrays: x_T and (mask, masked latents, context, tokens) for cond and uncond."""
    rng = np.random.default_rng(seed)
    u = cat_cfg.unet
    latent_channels = u.in_channels - 1 - u.out_channels
    tokens = (cat_cfg.inpainter.grid_size // 2) ** 2
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    mask = (rng.random((batch, latent, latent, 1)) < 0.4).astype(np.float32)
    masked_latents = normal(batch, latent, latent, latent_channels)
    context_len, context_dim = cat_cfg.clip_text.max_positions, u.cross_attention_dim
    cond = (mask, masked_latents, normal(batch, context_len, context_dim),
            normal(batch, tokens, u.ref_dim))  # fmt: skip
    uncond = (mask, masked_latents, normal(batch, context_len, context_dim),
              np.zeros((batch, tokens, u.ref_dim), np.float32))  # fmt: skip
    return normal(batch, latent, latent, u.out_channels), cond, uncond


# ============================================================================ the two loops
@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"))
def ours_loop(graphdef, params, x_T, cond, uncond, guidance_scale, *, num_steps: int):
    """Final latents of `num_steps` guided DDIM steps from x_T (catflax.diffusion)."""
    unet = nnx.merge(graphdef, params)

    def model_fn(x, t, c):
        mask, masked_latents, context, tokens = c
        return unet(jnp.concatenate([x, mask, masked_latents], -1), t, context, tokens)

    return diffusion.ddim_sample(
        model_fn, cond, uncond, key=jax.random.key(0), shape=x_T.shape, num_steps=num_steps,
        guidance_scale=guidance_scale, x_T=x_T,
    )  # fmt: skip


@torch.no_grad()
def torch_loop(unet, x_T, cond, uncond, guidance_scale: float, num_steps: int):
    """The reference's loop: concat [uncond; cond], one UNet call, guidance, DDIM (eta 0)."""
    timesteps, alpha_t, alpha_prev = diffusion.ddim_alphas(num_steps)
    mask, masked_latents, context, tokens = (torch.cat([u, c]) for c, u in zip(cond, uncond))
    x = x_T
    for t, a_t, a_prev in zip(timesteps.tolist(), alpha_t.tolist(), alpha_prev.tolist()):
        x2 = torch.cat([x, x])
        eps = unet(torch.cat([x2, mask, masked_latents], 1), t, context,
                   cross_attention_kwargs={"ref_tokens": tokens}).sample  # fmt: skip
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        pred_x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * pred_x0 + (1.0 - a_prev) ** 0.5 * eps
    return x


def time_torch(fn, repeats: int, device) -> list[float]:
    """Seconds of each of `repeats` calls after one warm-up, the device synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


# ============================================================================ the benchmark
def run(config, batch_sizes, resolution: int, num_steps: int, repeats: int,
        torch_dtype: str | None = None) -> dict:  # fmt: skip
    """Times both loops per batch size; returns the benchmark record (also printed)."""
    cat_cfg = CATConfig.from_dict(config.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch_dtype or ("float16" if device.type == "cuda" else "float32")
    t_dtype = getattr(torch, torch_dtype)
    scale = float(config.sampling.guidance_scale)
    latent = resolution // common.latent_factor(cat_cfg)
    with tempfile.TemporaryDirectory() as workdir:
        torch_unet, ours = shared_unets(cat_cfg, workdir, config.seed, t_dtype, device)
    graphdef, params = nnx.split(ours)

    results = {}
    for b in batch_sizes:
        x_T, cond, uncond = random_conditioning(cat_cfg, b, latent, config.seed)
        j_args = [jnp.asarray(x_T), tuple(map(jnp.asarray, cond)), tuple(map(jnp.asarray, uncond))]
        start = time.perf_counter()
        compiled = ours_loop.lower(graphdef, params, *j_args, scale, num_steps=num_steps).compile()
        compile_s = time.perf_counter() - start
        ours_times = common.time_calls(lambda: compiled(params, *j_args, scale), repeats)  # noqa: B023

        nchw = lambda a: torch.from_numpy(  # noqa: E731
            np.ascontiguousarray(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a)
        ).to(device=device, dtype=t_dtype)
        t_args = [nchw(x_T), tuple(map(nchw, cond)), tuple(map(nchw, uncond))]
        run_torch = lambda: torch_loop(torch_unet, *t_args, scale, num_steps)  # noqa: B023,E731
        torch_times = time_torch(run_torch, repeats, device)

        ours_out = np.asarray(compiled(params, *j_args, scale), np.float32)
        torch_out = run_torch().float().cpu().numpy().transpose(0, 2, 3, 1)
        ours_s, torch_s = (common.summary(ts)["median_s"] for ts in (ours_times, torch_times))
        results[str(b)] = dict(
            compile_s=compile_s, ours_loop_s=ours_s, torch_loop_s=torch_s, ratio=ours_s / torch_s,
            ours_step_ms=1e3 * ours_s / num_steps, torch_step_ms=1e3 * torch_s / num_steps,
            max_abs_diff=float(np.abs(ours_out - torch_out).max()),
            times_s=dict(ours=ours_times, torch=torch_times),
        )  # fmt: skip

    record = dict(
        benchmark="sampling_vs_pytorch", **common.machine(), torch=torch.__version__,
        torch_device=str(device), torch_dtype=torch_dtype,
        torch_device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        ours_dtype=cat_cfg.unet.dtype, ours_attention=cat_cfg.unet.attention,
        resolution=resolution, latent=latent, num_steps=num_steps, guidance_scale=scale,
        repeats=repeats, unet=dict(config.model.unet), batches=results,
    )  # fmt: skip
    common.emit_json(record)
    rows = [dict(batch=b, **{k: v for k, v in r.items() if k != "times_s"})
            for b, r in results.items()]  # fmt: skip
    common.print_table(
        rows,
        ["batch", "compile_s", "ours_loop_s", "torch_loop_s", "ratio", "ours_step_ms",
         "torch_step_ms", "max_abs_diff"],
        title=f"{num_steps}-step DDIM + CFG loop at {resolution} px ({latent}x{latent} latents); "
        f"ours {cat_cfg.unet.dtype} on {record['device_kind']}, PyTorch {torch_dtype} on "
        f"{record['torch_device_name']}; seconds, median of {repeats}; ratio = ours / PyTorch",
    )  # fmt: skip
    return record


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS["config"].value
    torch.set_num_threads(os.cpu_count() or 1)
    run(config, **sampling.command_line_args(config), torch_dtype=FLAGS["torch_dtype"].value)


def define_flags() -> None:
    """bench/sampling.py's command line and --torch_dtype (only when run as a script)."""
    sampling.define_flags()
    FLAGS.update(sampling.FLAGS)
    FLAGS["torch_dtype"] = flags.DEFINE_enum(
        "torch_dtype", None, ["float16", "bfloat16", "float32"],
        "PyTorch's dtype (default: float16 on a CUDA GPU, float32 otherwise).",
    )  # fmt: skip


if __name__ == "__main__":
    define_flags()
    app.run(main)
