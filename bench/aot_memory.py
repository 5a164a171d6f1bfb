"""Per-device memory and FLOPs of the full-size stage-2b step, compiled ahead of time for device
counts we do not have (fake CPU devices), with no weights materialised.

    python bench/aot_memory.py                                   # 8, 64, 256 devices
    python bench/aot_memory.py --device_counts=8 --fsdp=1,8 --per_device_batch=1,2 \
        --variants=fp32,bf16_remat

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N
must be set before jax starts). There the step (`catflax.train.steps.jit_step`, state donated)
is lowered from `jax.ShapeDtypeStruct`s carrying NamedShardings (parameters from
`nnx.eval_shape` + `catflax.sharding.param_shardings`, AdamW moments sharded like their
parameters, the batch over data x fsdp) and compiled; `memory_analysis()` gives per-device
argument / temporary / output bytes, `cost_analysis()` per-device FLOPs. These are XLA:CPU's
numbers: TPU and GPU compilers schedule and fuse differently, so temporaries there differ
(arguments, i.e. parameters + optimiser state + batch shards, hold everywhere up to layout
padding).

Mesh: `--fsdp` sizes (data takes the remaining devices; "all" = every device on fsdp).
Variants: fp32 (the reference's precision, no remat), bf16 (bf16 compute, fp32 parameters),
remat (UNet and inpainter blocks recomputed), and combinations with "_" (bf16_remat).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ACCELERATORS_GIB = {"v5e": 16, "v5p": 95, "h100": 80}  # memory per chip / GPU
HEADROOM = 0.9  # "fits": peak <= 90% of it (runtime, fragmentation, XLA's own reserve)
TRAINED = ("unet", "inpainter")


def variant_overrides(variant: str) -> dict[str, dict]:
    """Config changes per model part for a variant name such as "bf16_remat"."""
    parts = ("clip_text", "clip_vision", "vae", "unet", "inpainter")
    out: dict[str, dict] = {p: {} for p in parts}
    for piece in variant.split("_"):
        if piece == "bf16":
            for p in parts:
                out[p]["dtype"] = "bfloat16"
        elif piece == "remat":
            for p in TRAINED:
                out[p]["remat"] = True
        elif piece != "fp32":
            raise ValueError(f"unknown variant piece {piece!r} in {variant!r}: fp32, bf16, remat")
    return out


def load_config(path: str):
    """A config file's get_config() (the `--config=configs/x.py[:arg]` convention)."""
    import importlib.util

    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# ============================================================================ one compile
def abstract_step(config, mesh, global_batch: int, resolution: int):
    """(setup, jitted stage-2b step, its abstract arguments) on `mesh`, no weights made."""
    import jax

    from bench import common
    from catflax import sharding as sharding_lib
    from catflax.models.cat import CATConfig
    from catflax.train.loop import abstract_model
    from catflax.train.steps import create_state, jit_step

    abstract = abstract_model(config)
    shardings = sharding_lib.param_shardings(abstract, mesh, dict(config.sharding_rules))
    setup = common.stage_setup(config, "2b", abstract)
    state_sh = common.train_state_shardings(setup, shardings, mesh, ema=False)
    frozen_sh = common.tree_of_shardings(setup.frozen, shardings)

    def attach(tree, sh):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree, sh)  # fmt: skip

    abs_state = jax.eval_shape(
        lambda p: create_state(p, setup.tx, jax.random.key(0), False), setup.trainable
    )
    cat_cfg = CATConfig.from_dict(config.model)
    batch = common.abstract_batch(cat_cfg, global_batch, resolution, mesh)
    batch_sh = {k: v.sharding for k, v in batch.items()}
    step_fn = jit_step(setup.graphdef, setup.tx, setup.step_cfg, state_sh, frozen_sh, batch_sh)
    return setup, step_fn, (attach(abs_state, state_sh), attach(setup.frozen, frozen_sh), batch)


def compile_one(config, fsdp: int, global_batch: int, variant: str, resolution: int) -> dict:
    """AOT-compiles the stage-2b step on a (data, fsdp) mesh over all devices; its numbers."""
    import jax

    from bench import common
    from catflax import sharding as sharding_lib
    from catflax.train.steps import compiled_flops

    n = jax.device_count()
    config = config.copy_and_resolve_references()
    for part, fields in variant_overrides(variant).items():
        config.model[part].update(fields)
    mesh = sharding_lib.make_mesh(dict(data=n // fsdp, fsdp=fsdp, tensor=1))
    setup, step_fn, args = abstract_step(config, mesh, global_batch, resolution)
    start = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    mem = common.memory_stats(compiled)
    return dict(
        devices=n, mesh=dict(mesh.shape), global_batch=global_batch,
        per_device_batch=global_batch / n, variant=variant, resolution=resolution,
        compile_s=compile_s, tflop_per_device=compiled_flops(compiled) / 1e12,
        trained_params=count(setup.trainable), frozen_params=count(setup.frozen),
        **mem,
        fits={k: mem["peak_gib"] <= HEADROOM * v for k, v in ACCELERATORS_GIB.items()},
    )  # fmt: skip


def worker(args) -> None:
    """Runs in a process whose XLA_FLAGS already fake `args.devices` CPU devices."""
    import jax

    if jax.device_count() != args.devices:
        sys.exit(f"expected {args.devices} devices, jax sees {jax.device_count()}")
    config = load_config(args.config)
    resolution = args.resolution or config.data.resolution
    for variant in args.variants.split(","):
        for fsdp in mesh_fsdp_sizes(args.fsdp, args.devices):
            for per_device in [int(b) for b in args.per_device_batch.split(",")]:
                try:
                    row = compile_one(config, fsdp, per_device * args.devices, variant, resolution)
                except Exception as e:  # report and go on with the other combinations
                    error = f"{type(e).__name__}: {e}"[:500]
                    row = dict(devices=args.devices, fsdp=fsdp, variant=variant,
                               per_device_batch=per_device, error=error)  # fmt: skip
                print("AOT_ROW " + json.dumps(row), flush=True)


def mesh_fsdp_sizes(spec: str, devices: int) -> list[int]:
    sizes = []
    for s in spec.split(","):
        size = devices if s == "all" else int(s)
        if size <= devices and devices % size == 0 and size not in sizes:
            sizes.append(size)
    return sizes


# ============================================================================ orchestration
def run(args) -> dict:
    """One worker process per device count; gathers their rows into one record."""
    from bench import common

    rows = []
    for n in [int(d) for d in args.device_counts.split(",")]:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                   f"--xla_force_host_platform_device_count={n}".strip())  # fmt: skip
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--devices={n}",
               f"--config={args.config}", f"--fsdp={args.fsdp}",
               f"--per_device_batch={args.per_device_batch}", f"--variants={args.variants}",
               f"--resolution={args.resolution or 0}"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        got = [
            json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("AOT_ROW ")
        ]
        if proc.returncode != 0 and not got:
            got = [dict(devices=n, error=proc.stderr.strip().splitlines()[-1:] or ["failed"])]
        rows += got
        print(f"# {n} devices: {len(got)} compiles in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    record = dict(benchmark="aot_memory", date=time.strftime("%Y-%m-%d"), config=args.config,
                  headroom=HEADROOM, accelerators_gib=ACCELERATORS_GIB, rows=rows)  # fmt: skip
    common.emit_json(record)
    table = [
        dict(r, mesh="x".join(str(r["mesh"][a]) for a in ("data", "fsdp")),
             fits=",".join(k for k, ok in r["fits"].items() if ok) or "none")
        for r in rows if "error" not in r
    ]  # fmt: skip
    common.print_table(
        table,
        ["devices", "mesh", "global_batch", "variant", "arguments_gib", "temp_gib", "peak_gib",
         "tflop_per_device", "compile_s", "fits"],
        title=f"stage-2b step, AOT on fake CPU devices ({args.config}); mesh = data x fsdp; "
        f"GiB per device; fits = peak <= {HEADROOM:.0%} of the accelerator's memory",
    )  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"failed: {r}")
    return record


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/coco.py", help="config file (full size)")
    p.add_argument("--device_counts", default="8,64,256")
    p.add_argument("--fsdp", default="1,8,all", help="fsdp sizes; data takes the rest")
    p.add_argument("--per_device_batch", default="1,4")
    p.add_argument("--variants", default="fp32,bf16_remat")
    p.add_argument("--resolution", type=int, default=0, help="0: config.data.resolution")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per device count")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
