r"""Host memory of `catflax.evaluate` against --num: the evaluation streams, so it should not grow.

    python bench/eval_memory.py --config=configs/demo.py --nums=32,128 --resolution=64

Runs the whole evaluation (read, generate, write PNGs, preservation metrics) on generated
`synthetic_shapes` data with the config's model at random weights, once to compile and build the
data, then once per `--nums` entry under tracemalloc (numpy and Python allocations on the host;
device buffers are not counted). Prints one JSON line and a table: peak MiB per --num.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import tracemalloc

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from bench import common
from catflax import evaluate
from catflax.pipeline import CATPipeline

FLAGS = {}


def run(config, nums, resolution: int, batch_size: int, num_steps: int = 1) -> dict:
    """Peak traced host memory of one evaluation per entry of `nums`; returns the record."""
    from catflax import sharding as sharding_lib

    mesh = sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    graphdef, params, _ = common.host_init_params(config, mesh, config.seed)
    pipe = CATPipeline.from_model(
        nnx.merge(graphdef, params), resolution=resolution,
        sampling=dict(num_steps=num_steps, guidance_scale=3.0, eta=0.0),
    )  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        opts = lambda num: evaluate.Options(  # noqa: E731
            dataset="synthetic_shapes", split="validation", num=num, out=f"{tmp}/out{num}",
            data_dir=f"{tmp}/data", batch_size=batch_size, num_steps=num_steps,
        )  # fmt: skip
        evaluate.run(opts(batch_size), pipeline=pipe, report=lambda s: None)  # compile, build
        for num in nums:
            tracemalloc.start()
            start = time.perf_counter()
            evaluate.run(opts(num), pipeline=pipe, report=lambda s: None)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            results[str(num)] = dict(peak_mib=round(peak / 2**20, 2), seconds=round(seconds, 2))
    record = dict(
        benchmark="eval_memory", **common.machine(), resolution=resolution,
        batch_size=batch_size, num_steps=num_steps, runs=results,
    )  # fmt: skip
    common.emit_json(record)
    common.print_table(
        [dict(num=n, **r) for n, r in results.items()], ["num", "peak_mib", "seconds"],
        title=f"catflax.evaluate host memory (tracemalloc peak) at {resolution} px",
    )  # fmt: skip
    return record


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS["config"].value
    nums = [int(n) for n in FLAGS["nums"].value]
    run(config, nums, FLAGS["resolution"].value, FLAGS["batch_size"].value)


def define_flags() -> None:
    """The command line (only when run as a script, so importing this defines no flags)."""
    FLAGS["config"] = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
    FLAGS["nums"] = flags.DEFINE_list("nums", ["32", "128"], "--num values to measure.")
    FLAGS["resolution"] = flags.DEFINE_integer("resolution", 64, "Model image side.")
    FLAGS["batch_size"] = flags.DEFINE_integer("batch_size", 16, "Examples per model call.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
