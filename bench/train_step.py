"""Training-step throughput per stage: steady-state step time, examples/s, MFU, compile time.

    python bench/train_step.py --config=configs/demo.py --batch_size=8
    python bench/train_step.py --config=configs/coco.py --batch_size=16 --stages=2b \
        --config.model.unet.dtype=bfloat16 --config.model.unet.attention=cudnn

The step is the trainer's own (`catflax.train.steps.jit_step`: explicit shardings, state
donated) on random weights and a random batch of the pipeline's shapes, on a mesh over all
devices from `config.mesh`. FLOPs per device are the whole step's (XLA's cost analysis before
partitioning, every attention traced as `xla`: `catflax.train.steps.model_flops_per_device`)
over the device count; with remat on they include the recomputation, so "mfu" is then hardware
utilisation. "compiled_gflop_per_device" is the compiled program's own count, which misses work
in loops (`chunked` attention) and kernel custom calls (cuDNN, splash). MFU divides the FLOPs by
the median step time and `--peak_flops` (per device; default
`config.train.peak_flops_per_device`, else the device kind's bf16 peak from
`catflax.train.metrics.PEAK_BF16_FLOPS`; none known: no MFU). Compile time is reported
separately; "recompilations" counts compilations of the step during the warm-up and timed steps
(jax_log_compiles; 0 is right).
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from bench import common
from catflax import sharding as sharding_lib
from catflax.models.cat import CATConfig
from catflax.train.metrics import peak_flops_per_device
from catflax.train.steps import compiled_flops, create_state, jit_step, step_flops_per_device

FLAGS: dict = {}  # set by define_flags() when run as a script


def run(
    config, batch_size: int, resolution: int, stage_names, steps: int, warmup: int,
    peak_flops: float,
) -> dict:  # fmt: skip
    """Times each stage's step; returns the benchmark record (also printed)."""
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    cat_cfg = CATConfig.from_dict(config.model)
    graphdef, params, shardings = common.host_init_params(config, mesh, config.seed)
    model = nnx.merge(graphdef, params)
    host_batch = common.random_batch(cat_cfg, batch_size, resolution, seed=config.seed)
    batch = sharding_lib.global_batch(host_batch, mesh)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    ema = config.train.ema_decay > 0

    results = {}
    for stage in stage_names:
        setup = common.stage_setup(config, stage, model)
        state_sh = common.train_state_shardings(setup, shardings, mesh, ema)
        frozen_sh = common.tree_of_shardings(setup.frozen, shardings)
        make_state = jax.jit(
            lambda p, r, tx=setup.tx: create_state(p, tx, r, ema), out_shardings=state_sh
        )
        state = make_state(setup.trainable, jax.random.key(config.seed))
        step_fn = jit_step(setup.graphdef, setup.tx, setup.step_cfg, state_sh, frozen_sh, batch_sh)
        start = time.perf_counter()
        compiled = step_fn.lower(state, setup.frozen, batch).compile()
        compile_s = time.perf_counter() - start
        flops = step_flops_per_device(
            compiled, setup.graphdef, setup.tx, setup.step_cfg, state, setup.frozen, batch
        )
        holder = {"state": state}

        def one_step(holder=holder, step_fn=step_fn, frozen=setup.frozen):
            # The jitted function itself (it reuses the compilation above), as a trainer would
            # call it: a changed input structure or sharding would show as a recompilation.
            holder["state"], metrics = step_fn(holder["state"], frozen, batch)
            return metrics["loss"]

        with common.compile_events() as compiled_names:
            times = common.time_calls(one_step, steps, warmup)
        step_s = common.summary(times)["median_s"]
        results[stage] = dict(
            compile_s=compile_s, step_s=step_s, step_s_mean=common.summary(times)["mean_s"],
            examples_per_s=batch_size / step_s, gflop_per_device=flops / 1e9,
            compiled_gflop_per_device=compiled_flops(compiled) / 1e9,
            mfu=flops / step_s / peak_flops if peak_flops else None,
            loss=float(one_step()), recompilations=compiled_names.count("jit(train_step)"),
            memory=common.memory_stats(compiled),
        )  # fmt: skip
        del holder, compiled

    record = dict(
        benchmark="train_step", **common.machine(), batch_size=batch_size, resolution=resolution,
        mesh=dict(mesh.shape), peak_flops_per_device=peak_flops, steps=steps,
        model={k: dict(v) for k, v in config.model.items()}, stages=results,
    )  # fmt: skip
    common.emit_json(record)
    rows = [
        dict(stage=s, **{k: v for k, v in r.items() if k != "memory"},
             peak_gib=r["memory"].get("peak_gib"))
        for s, r in results.items()
    ]  # fmt: skip
    common.print_table(
        rows,
        [
            "stage",
            "compile_s",
            "step_s",
            "examples_per_s",
            "gflop_per_device",
            "mfu",
            "peak_gib",
            "recompilations",
        ],
        title=f"train step, batch {batch_size} at {resolution} px on {record['num_devices']} "
        f"{record['device_kind']} device(s), mesh {record['mesh']}",
    )
    return record


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS["config"].value
    run(
        config,
        batch_size=FLAGS["batch_size"].value or config.train.batch_size,
        resolution=FLAGS["resolution"].value or config.data.resolution,
        stage_names=FLAGS["stages"].value,
        steps=FLAGS["steps"].value,
        warmup=FLAGS["warmup"].value,
        peak_flops=peak_flops_per_device(
            FLAGS["peak_flops"].value or config.train.peak_flops_per_device
        ),
    )


def define_flags() -> None:
    """The command line (only when run as a script, so importing this defines no flags)."""
    FLAGS["config"] = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
    FLAGS["batch_size"] = flags.DEFINE_integer(
        "batch_size", None, "Global batch (default: config.train)."
    )
    FLAGS["resolution"] = flags.DEFINE_integer(
        "resolution", None, "Image side (default: config.data)."
    )
    FLAGS["stages"] = flags.DEFINE_list("stages", ["1a", "1b", "2a", "2b"], "Stages to time.")
    FLAGS["steps"] = flags.DEFINE_integer("steps", 10, "Timed steps per stage.")
    FLAGS["warmup"] = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    FLAGS["peak_flops"] = flags.DEFINE_float(
        "peak_flops", None, "Peak FLOP/s per device (default: config, else the device's bf16 peak)."
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
