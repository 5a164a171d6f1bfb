"""Shared pieces of the benchmarks: batches of the pipeline's shapes, stage set-up with properly
sharded optimiser state, timing, and the JSON line + table every benchmark prints."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from catflax import sharding as sharding_lib
from catflax.models.cat import CATConfig
from catflax.train import loop, optim, stages, steps
from catflax.train.steps import StepConfig

BOS, EOS = 49406, 49407  # CLIP's start and end (and pad) tokens


# ============================================================================ inputs
def latent_factor(cfg: CATConfig) -> int:
    return 2 ** (len(cfg.vae.block_out_channels) - 1)


def random_batch(
    cfg: CATConfig, batch: int, resolution: int, seed: int = 0, prompt_tokens: int = 8
) -> dict[str, np.ndarray]:
    """A host batch with the keys, shapes and dtypes of `catflax.data.feed.Feed.next_local`."""
    rng = np.random.default_rng(seed)
    R, C, G = resolution, cfg.clip_vision.image_size, cfg.inpainter.grid_size
    L, vocab = cfg.clip_text.max_positions, cfg.clip_text.vocab_size
    h = R // latent_factor(cfg)
    eos = cfg.clip_text.eos_token_id
    bos = BOS if BOS < vocab and BOS != eos else 0
    ids = np.full((batch, L), eos, np.int32)  # BOS, prompt, EOS, EOS padding (CLIP's pad token)
    ids[:, 0] = bos
    body = rng.integers(1, min(vocab, BOS) - 1, (batch, prompt_tokens))
    ids[:, 1 : 1 + prompt_tokens] = np.where(body == eos, 1, body)
    empty = np.full((batch, L), eos, np.int32)
    empty[:, 0] = bos
    mask16 = (rng.random((batch, G, G)) < 0.4).astype(np.int32)
    return dict(
        image512=rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32),
        masked512=rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32),
        image224=rng.integers(0, 256, (batch, C, C, 3), dtype=np.uint8),
        masked224=rng.integers(0, 256, (batch, C, C, 3), dtype=np.uint8),
        mask64=(rng.random((batch, h, h, 1)) < 0.4).astype(np.float32),
        mask16=mask16,
        input_ids=ids,
        empty_ids=empty,
    )


def abstract_batch(cfg: CATConfig, batch: int, resolution: int, mesh) -> dict[str, Any]:
    """ShapeDtypeStructs of `random_batch`, batch-sharded over (data, fsdp): nothing allocated."""
    spec = jax.eval_shape(lambda: random_batch(cfg, 1, resolution))
    return {
        k: jax.ShapeDtypeStruct(
            (batch, *v.shape[1:]), v.dtype, sharding=sharding_lib.batch_sharding(mesh, v.ndim)
        )
        for k, v in spec.items()
    }


# ============================================================================ parameters
def host_init_params(config, mesh, seed: int = 0):
    """(graphdef, params, shardings) like `catflax.train.loop.init_params`, but drawn with numpy
    on the host and placed shard by shard: XLA:CPU takes minutes to compile the jitted random
    init of even the demo model. Kernels U(+-1/sqrt(fan_in)), norm scales 1, biases 0,
    tables N(0, 0.02); the values only need to be of a sensible scale for timing."""
    from catflax.train.loop import abstract_model

    abstract = abstract_model(config)
    shardings = sharding_lib.param_shardings(abstract, mesh, dict(config.sharding_rules))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(abstract_params):
        shape, dtype, leaf = var.get_value().shape, var.get_value().dtype, path[-1]
        if leaf == "kernel":
            bound = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
            value = rng.uniform(-bound, bound, shape)
        elif leaf == "scale":
            value = np.ones(shape)
        elif leaf == "bias":
            value = np.zeros(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        flat.append((path, var.replace(jax.device_put(value.astype(dtype), shardings[path]))))
    return graphdef, nnx.from_flat_state(flat), shardings


# ============================================================================ stage set-up
@dataclasses.dataclass
class StageSetup:
    graphdef: nnx.GraphDef
    trainable: nnx.State  # concrete or abstract
    frozen: nnx.State
    tx: optax.GradientTransformation
    step_cfg: StepConfig


def stage_setup(config, stage: str, model: nnx.Module) -> StageSetup:
    """What `catflax.train.loop.run_stage` builds for a stage: split, optimiser, step config."""
    spec = stages.stage_spec(stage)
    graphdef, trainable, frozen = nnx.split(model, stages.trainable_filter(spec), ...)
    tx = optim.make_optimizer(loop.optimizer_config(config, stage), trainable)
    step_cfg = loop.step_config(config, stage)
    return StageSetup(graphdef, trainable, frozen, tx, step_cfg)


def tree_of_shardings(state: nnx.State, shardings: Mapping[tuple, Any]) -> Any:
    """A tree shaped like `state` (Variables and all) holding each parameter's sharding."""
    return steps.param_tree_shardings(state, shardings)


def train_state_shardings(setup: StageSetup, shardings: Mapping[tuple, Any], mesh, ema: bool):
    """The trainer's TrainState shardings (AdamW moments and EMA sharded like their params)."""
    return steps.state_shardings(setup.trainable, setup.tx, shardings, mesh, ema)


def memory_stats(compiled) -> dict[str, float]:
    """Per-device bytes from the compiled memory analysis, in GiB; peak = args + outputs +
    temporaries - donated (aliased) buffers."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = lambda b: b / 2**30  # noqa: E731
    peak = (
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )  # fmt: skip
    return dict(
        arguments_gib=gib(m.argument_size_in_bytes), outputs_gib=gib(m.output_size_in_bytes),
        temp_gib=gib(m.temp_size_in_bytes), aliased_gib=gib(m.alias_size_in_bytes),
        peak_gib=gib(peak), code_gib=gib(m.generated_code_size_in_bytes),
    )  # fmt: skip


# ============================================================================ timing
@contextlib.contextmanager
def compile_events():
    """The functions jax compiles inside the block (names, in order), from jax_log_compiles;
    the messages are kept from the console."""
    names: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                names.append(message.split(" ", 2)[1])

    logger, handler = logging.getLogger("jax"), Collect()
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn() (results blocked on), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    return dict(
        median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
        max_s=max(times), n=len(times),
    )  # fmt: skip


# ============================================================================ report
def machine() -> dict[str, Any]:
    devices = jax.devices()
    return dict(
        platform=devices[0].platform, device_kind=devices[0].device_kind,
        num_devices=len(devices), host=platform.processor() or platform.machine(),
        jax=jax.__version__, date=datetime.date.today().isoformat(),
    )  # fmt: skip


def emit_json(record: Mapping[str, Any]) -> None:
    """The one JSON line of a benchmark (non-finite floats become null)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x

    print(json.dumps(clean(dict(record))), flush=True)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
