"""Benchmarks: each one's main path runs on the tiny model and prints its JSON line; the jitted
train step compiles once and is reused across steps."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from bench import (
    aot_memory,
    common,
    eval_memory,
    sampling,
    sampling_vs_pytorch,
    train_step,
    vs_pytorch,
)
from configs import demo
from tests.tiny import RESOLUTION, TINY_CAT

PARTS = ("clip_text", "clip_vision", "vae", "unet", "inpainter")


def tiny_config() -> ml_collections.ConfigDict:
    """configs/demo.py with tests/tiny.py's model on a data=2 x fsdp=4 mesh."""
    config = demo.get_config()
    config.model = ml_collections.ConfigDict(
        {p: dataclasses.asdict(getattr(TINY_CAT, p)) for p in PARTS}
    )
    config.data.resolution = RESOLUTION
    config.mesh.data, config.mesh.fsdp = 2, 4
    return config


def json_line(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_train_step_bench_compiles_the_step_once(capsys):
    """The benchmark's JSON line; and its 1 + 3 steps all run on one compilation."""
    with common.compile_events() as compiled:
        train_step.run(tiny_config(), batch_size=8, resolution=RESOLUTION, stage_names=["2b"],
                       steps=2, warmup=1, peak_flops=1e11)  # fmt: skip
    record = json_line(capsys.readouterr().out)
    assert record["benchmark"] == "train_step" and record["num_devices"] == 8
    assert record["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    stage = record["stages"]["2b"]
    keys = {"compile_s", "step_s", "examples_per_s", "gflop_per_device", "mfu", "memory"}
    assert keys <= set(stage)
    assert stage["gflop_per_device"] > 0 and 0 < stage["mfu"] < 1
    assert stage["examples_per_s"] == pytest.approx(8 / stage["step_s"])
    assert np.isfinite(stage["loss"]) and stage["memory"]["peak_gib"] > 0
    # jax logs a lowering as "Compiling": the step's own, and model_flops_per_device's trace
    # (lowered only, for the cost analysis); none while the steps ran.
    assert compiled.count("jit(train_step)") == 2 and stage["recompilations"] == 0, compiled
    assert stage["compiled_gflop_per_device"] > 0  # the partitioned program's own count
    # The train state is donated: its buffers are reused for the new state (aliased).
    assert stage["memory"]["aliased_gib"] > 0.5 * stage["memory"]["arguments_gib"]


def test_sampling_bench(capsys):
    sampling.run(tiny_config(), batch_sizes=[2], resolution=RESOLUTION, num_steps=2, repeats=1)
    record = json_line(capsys.readouterr().out)
    assert record["benchmark"] == "sampling" and record["num_steps"] == 2
    assert {"compile_s", "latency_s", "images_per_s", "unet_cfg_step_ms"} <= set(
        record["batches"]["2"]
    )


def test_eval_memory_bench(capsys):
    config = tiny_config()  # with the real CLIP vocabulary: evaluate tokenizes real prompts
    config.model.clip_text.vocab_size, config.model.clip_text.eos_token_id = 49408, 49407
    eval_memory.run(config, nums=[3], resolution=RESOLUTION, batch_size=2)
    record = json_line(capsys.readouterr().out)
    assert record["benchmark"] == "eval_memory" and record["runs"]["3"]["peak_mib"] > 0


def test_vs_pytorch_bench(capsys):
    record = vs_pytorch.run(TINY_CAT, batch_size=2, resolution=RESOLUTION, steps=1,
                            variants=["chunked"])  # fmt: skip
    assert json_line(capsys.readouterr().out) == json.loads(json.dumps(record))
    v = record["variants"]["chunked"]
    assert {"ours_step_s", "torch_step_s", "step_ratio", "ours_unet_s", "unet_ratio"} <= set(v)
    assert v["step_ratio"] == pytest.approx(v["ours_step_s"] / v["torch_step_s"])
    # Both sides start from the same weights: the UNet-with-adapter forward agrees.
    assert v["unet_max_abs_diff"] < 1e-4
    assert set(record["torch_breakdown_s"]) >= {"clip text x2", "vae encoder x2", "backward"}


def test_sampling_vs_pytorch_bench_loops_agree(capsys):
    """Ours and PyTorch's guided DDIM loops, same UNet weights, fp32: same final latents."""
    record = sampling_vs_pytorch.run(tiny_config(), batch_sizes=[2], resolution=RESOLUTION,
                                     num_steps=4, repeats=1)  # fmt: skip
    assert json_line(capsys.readouterr().out) == json.loads(json.dumps(record))
    assert record["torch_dtype"] == "float32" and record["num_steps"] == 4
    b = record["batches"]["2"]
    assert b["ratio"] == pytest.approx(b["ours_loop_s"] / b["torch_loop_s"])
    assert b["max_abs_diff"] < 1e-3, b["max_abs_diff"]


def test_aot_memory_compiles_without_weights():
    config = tiny_config()
    # The same step and mesh as test_train_step_bench_compiles_the_step_once, lowered from
    # abstract shapes (jax reuses that compilation when both run in one session).
    row = aot_memory.compile_one(config, fsdp=4, global_batch=8, variant="fp32",
                                 resolution=RESOLUTION)  # fmt: skip
    assert row["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and row["per_device_batch"] == 1
    assert row["peak_gib"] > 0 and row["tflop_per_device"] > 0 and row["fits"]["v5e"]
    assert row["trained_params"] > 0 and row["frozen_params"] > 0
    assert aot_memory.mesh_fsdp_sizes("1,8,all", 64) == [1, 8, 64]
    assert aot_memory.mesh_fsdp_sizes("1,8,all", 4) == [1, 4]
    assert aot_memory.variant_overrides("bf16_remat")["unet"] == {
        "dtype": "bfloat16",
        "remat": True,
    }
    with pytest.raises(ValueError, match="unknown variant piece"):
        aot_memory.variant_overrides("fp16")


def test_cpu_ops_bench(capsys):
    """One JAX child process per flag mode, PyTorch in this one; every op timed both ways."""
    from bench import cpu_ops

    cpu_ops.main(["--modes=catflax,jaxlib_default", "--batch=1", "--repeats=1"])
    record = json_line(capsys.readouterr().out)
    ops = set(cpu_ops.op_shapes())
    assert set(record["torch_ms"]) == ops
    for mode in ("catflax", "jaxlib_default"):
        assert set(record["jax_ms"][mode]) == ops
        for times in record["jax_ms"][mode].values():
            assert 0 < times["forward"] and 0 < times["forward_backward"]
    ynn = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert ynn in record["xla_flags"]["catflax"].split()
    assert ynn not in record["xla_flags"]["jaxlib_default"]


def test_cpu_bf16_bench(capsys):
    """Every matmul / conv dtype row, both sides, with a rate."""
    from bench import cpu_bf16

    cpu_bf16.main(["--size=128", "--repeats=1"])
    rows = json_line(capsys.readouterr().out)["rows"]
    seen = {(r["op"].split()[0], r["dtype"], r["side"]) for r in rows}
    for op in ("matmul", "conv3x3"):
        assert {(op, d, "jax") for d in ("fp32", "bf16", "bf16 -> fp32")} <= seen
        assert {(op, d, "torch") for d in ("fp32", "bf16")} <= seen
    assert all(r["gflops"] > 0 for r in rows)


def test_data_pipeline_bench(capsys):
    """Every per-example stage timed; in-process and worker-process rates from real batches."""
    from bench import data_pipeline

    data_pipeline.run(resolution=64, clip_resolution=32, examples=4, batch_size=2, batches=2,
                      workers=1)  # fmt: skip
    record = json_line(capsys.readouterr().out)
    assert record["benchmark"] == "data_pipeline" and record["resolution"] == 64
    assert set(record["ms_per_example"]) == {"decode image", "decode mask", "geometry", "tokenize"}
    assert all(ms > 0 for ms in record["ms_per_example"].values())
    assert set(record["examples_per_s"]) == {"in process", "workers=1"}
    assert all(rate > 0 for rate in record["examples_per_s"].values())
