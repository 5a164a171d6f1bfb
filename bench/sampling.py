"""Sampling latency: 50-step DDIM with classifier-free guidance, one image and a batch.

    python bench/sampling.py --config=configs/demo.py --batch_sizes=1,4
    python bench/sampling.py --config=configs/coco.py --batch_sizes=1,8 \
        --config.model.unet.dtype=bfloat16 --config.model.unet.attention=cudnn

`catflax.pipeline`'s own jitted sampler (`_generate`, the model state an argument): CLIP
text (prompt and empty prompt), CLIP vision on the masked image, the semantic inpainter, the
VAE encoder on the masked image, `num_steps` DDIM steps whose two guidance branches run as one
2B-batch UNet call, the VAE decoder and the uint8 images. Latency is wall time from inputs on
the device to the decoded images ready, median of `--repeats` calls after one warm-up; compile
time separately.
"""

from __future__ import annotations

import functools
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from bench import common
from catflax import pipeline as pipeline_lib
from catflax.models.cat import CATConfig

FLAGS: dict = {}  # set by define_flags() when run as a script


@functools.partial(jax.jit, static_argnames=("graphdef",))
def guided_unet_call(graphdef, unet_params, x, t, cond, uncond):
    """One denoising step's model work: the UNet on the 2B batch [uncond; cond]."""
    unet = nnx.merge(graphdef, unet_params)
    both = [jnp.concatenate([u, c]) for c, u in zip(cond, uncond)]
    x2 = jnp.concatenate([x, x])
    mask, latents, ctx, tok = both
    return unet(jnp.concatenate([x2, mask, latents], -1), jnp.concatenate([t, t]), ctx, tok)


def time_batch(cat_cfg, graphdef, params, b, resolution, num_steps, repeats, scale, seed):
    """Compile time and latency of the pipeline's sampler for batch b, and one guided UNet call
    alone."""
    host = common.random_batch(cat_cfg, b, resolution, seed=seed)
    inputs = {k: v for k, v in host.items() if k != "image512"}
    inputs["seeds"] = np.arange(seed, seed + b, dtype=np.uint32)
    inputs, scale, eta = jax.device_put(inputs), np.float32(scale), np.float32(0.0)
    start = time.perf_counter()
    compiled = pipeline_lib._generate.lower(
        graphdef, params, inputs, scale, eta, num_steps=num_steps, stochastic=False, guided=True
    ).compile()
    compile_s = time.perf_counter() - start
    times = common.time_calls(lambda: compiled(params, inputs, scale, eta), repeats)
    # One step's UNet call alone (2B batch, its own dispatch included), for comparison.
    unet_graphdef, unet_params = nnx.split(nnx.merge(graphdef, params).unet)
    u, h = cat_cfg.unet, host["mask64"].shape[1]
    x = jnp.zeros((b, h, h, u.out_channels))
    t = jnp.full((b,), 501, jnp.int32)
    ctx = jnp.zeros((b, cat_cfg.clip_text.max_positions, cat_cfg.clip_text.hidden_size))
    tok = jnp.zeros((b, (cat_cfg.inpainter.grid_size // 2) ** 2, u.ref_dim))
    lat = jnp.zeros((b, h, h, u.in_channels - 1 - u.out_channels))
    cond = (jnp.asarray(host["mask64"]), lat, ctx, tok)
    unet_call = guided_unet_call.lower(unet_graphdef, unet_params, x, t, cond, cond).compile()
    unet_times = common.time_calls(lambda: unet_call(unet_params, x, t, cond, cond), repeats)
    latency = common.summary(times)["median_s"]
    return dict(
        compile_s=compile_s, latency_s=latency, latency_s_mean=common.summary(times)["mean_s"],
        images_per_s=b / latency, unet_cfg_step_ms=common.summary(unet_times)["median_s"] * 1e3,
    )  # fmt: skip


def run(config, batch_sizes, resolution: int, num_steps: int, repeats: int) -> dict:
    """Times the sampler for each batch size; returns the benchmark record (also printed)."""
    from catflax import sharding as sharding_lib

    cat_cfg = CATConfig.from_dict(config.model)
    mesh = sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    graphdef, params, _ = common.host_init_params(config, mesh, config.seed)
    scale = float(config.sampling.guidance_scale)
    results = {
        str(b): time_batch(cat_cfg, graphdef, params, b, resolution, num_steps, repeats, scale,
                           config.seed)
        for b in batch_sizes
    }  # fmt: skip

    record = dict(
        benchmark="sampling", **common.machine(), resolution=resolution, num_steps=num_steps,
        guidance_scale=scale, repeats=repeats,
        model={k: dict(v) for k, v in config.model.items()}, batches=results,
    )  # fmt: skip
    common.emit_json(record)
    rows = [dict(batch=b, **r) for b, r in results.items()]
    common.print_table(
        rows,
        ["batch", "compile_s", "latency_s", "images_per_s", "unet_cfg_step_ms"],
        title=f"{num_steps}-step DDIM + CFG at {resolution} px on one {record['device_kind']} "
        "device (latency: text, tokens, VAE encode, loop, VAE decode)",
    )
    return record


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS["config"].value
    run(config, **command_line_args(config))


def command_line_args(config) -> dict:
    """`run`'s batch_sizes, resolution, num_steps and repeats from the flags (and `config`)."""
    return dict(
        batch_sizes=[int(b) for b in FLAGS["batch_sizes"].value],
        resolution=FLAGS["resolution"].value or config.data.resolution,
        num_steps=FLAGS["num_steps"].value or config.sampling.num_steps,
        repeats=FLAGS["repeats"].value,
    )


def define_flags() -> None:
    """The command line (only when run as a script, so importing this defines no flags)."""
    FLAGS["config"] = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
    FLAGS["batch_sizes"] = flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes to time.")
    FLAGS["resolution"] = flags.DEFINE_integer(
        "resolution", None, "Image side (default: config.data)."
    )
    FLAGS["num_steps"] = flags.DEFINE_integer(
        "num_steps", None, "DDIM steps (default: config.sampling)."
    )
    FLAGS["repeats"] = flags.DEFINE_integer("repeats", 3, "Timed calls per batch size.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
