"""The stage loop: build the model into its shardings, resume, train, checkpoint, hand over.

Resume order (each stage lives in WORKDIR/<stage>/; WORKDIR local or gs://):
  1. WORKDIR/<stage>/final/params committed -> the stage is done; skip it.
  2. WORKDIR/<stage>/checkpoints has one    -> restore state, data iterator and step; continue
                                               (at the last step: save final/ and go on).
  3. otherwise                              -> start: pretrained weights (config.weights), then
                                               the final parameters of every earlier stage (the
                                               merge).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from catflax import paths
from catflax import sharding as sharding_lib
from catflax.models.cat import CATConfig, CATDiffusion
from catflax.models.rngs import abstract_module
from catflax.models.rngs import rngs as model_rngs
from catflax.train import optim, resume_checks, stages
from catflax.train.checkpoint import Checkpointer, abstract_state
from catflax.train.metrics import MetricWriter, peak_flops_per_device
from catflax.train.preemption import PreemptionNotice, sum_over_processes
from catflax.train.samples import write_sample_grid
from catflax.train.steps import (
    PREEMPT_KEY,
    StepConfig,
    create_sharded_state,
    jit_step,
    jit_validation,
    sharding_of,
    step_flops_per_device,
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


# ============================================================================ model
def abstract_model(config) -> CATDiffusion:
    cat_cfg = CATConfig.from_dict(config.model)
    return abstract_module(lambda rngs: CATDiffusion(cat_cfg, rngs=rngs), config.seed)


_INIT_CACHE: dict = {}


def init_params(config, mesh) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """Random parameters created directly in their shardings (nothing lands on one device).

    Every stage starts from the same seeded init. Its compiled program is kept for the run (the
    jitted init of hundreds of random tensors compiles slowly on CPU) and run again for each
    stage; the parameters themselves are not kept, so they take no device memory while a stage
    trains.
    """
    key = (config.model.to_json(), config.seed, str(config.sharding_rules), id(mesh))
    if key not in _INIT_CACHE:
        _INIT_CACHE.clear()
        _INIT_CACHE[key] = _compile_init(config, mesh)
    graphdef, make, shardings = _INIT_CACHE[key]
    return graphdef, make(), shardings


def _compile_init(config, mesh):
    cat_cfg = CATConfig.from_dict(config.model)
    abstract = abstract_model(config)
    shardings = sharding_lib.param_shardings(abstract, mesh, dict(config.sharding_rules))
    unsplit = sharding_lib.unsplit_report(abstract, shardings, dict(config.sharding_rules))
    if unsplit:
        logging.warning("sharding: %s", unsplit)
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    out = sharding_lib.state_shardings(abstract_params, shardings)
    make = lambda: nnx.state(CATDiffusion(cat_cfg, rngs=model_rngs(config.seed)), nnx.Param)  # noqa: E731
    return graphdef, jax.jit(make, out_shardings=out).lower().compile(), shardings


def load_pretrained(config, params: nnx.State, shardings) -> list[str]:
    """Replaces parts of `params` by the pretrained weights that config.weights names."""
    from catflax.weights import pretrained

    return pretrained.load_into(params, shardings, config)


def run_path(workdir: str, *parts: str) -> epath.Path:
    """A path inside the run directory: a local one made absolute (orbax wants that), a URL
    such as gs://BUCKET/DIR kept as it is."""
    path = epath.Path(workdir, *parts)
    return path if paths.is_remote(workdir) else path.resolve()


def final_dir(workdir: str, stage: str) -> epath.Path:
    return run_path(workdir, stage, "final")


def stage_finished(workdir: str, stage: str) -> bool:
    """Whether the stage's final parameters were saved completely (an interrupted save leaves
    an uncommitted orbax directory, which does not count)."""
    params = final_dir(workdir, stage) / "params"
    return params.exists() and ocp.path.step.is_path_finalized(params)


def merge_earlier_stages(workdir: str, stage: str, params: nnx.State) -> list[str]:
    """The reference's merge: each part comes from the latest earlier stage that trained it."""
    order = list(stages.STAGE_ORDER)
    taken = []
    for part in ("inpainter", "unet"):
        for earlier in reversed(order[: order.index(stage)]):
            if part in stages.STAGES[earlier].trains and stage_finished(workdir, earlier):
                restored = _restore_final(workdir, earlier, params)
                if part in restored:
                    params[part] = restored[part]
                    taken.append(f"{part} from stage {earlier}")
                    break
    return taken


def _restore_final(workdir: str, stage: str, like: nnx.State) -> nnx.State:
    trained = stages.STAGES[stage].trains
    target = nnx.State({p: like[p] for p in trained})
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
    )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(final_dir(workdir, stage) / "params", abstract)


def save_final(workdir: str, stage: str, params: nnx.State) -> None:
    path = final_dir(workdir, stage) / "params"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)  # force: over an interrupted (uncommitted) save
        ckptr.wait_until_finished()


# ============================================================================ stage
def optimizer_config(config, stage: str) -> optim.OptimizerConfig:
    """The stage's AdamW groups, clipping, warmup and (stage 1a) reduce-on-plateau."""
    scfg = config[f"stage_{stage}"]
    return optim.OptimizerConfig(
        lr_fast=scfg.lr_fast, lr_slow=scfg.lr_slow, warmup_steps=scfg.warmup_steps,
        weight_decay=config.optimizer.weight_decay, grad_clip_norm=config.optimizer.grad_clip_norm,
        reduce_on_plateau=scfg.get("plateau_every", 0) > 0,
    )  # fmt: skip


def step_config(config, stage: str) -> StepConfig:
    spec, scfg = stages.stage_spec(stage), config[f"stage_{stage}"]
    return StepConfig(
        kind=spec.step, tokens=spec.tokens, cond_dropout=config.train.cond_dropout,
        masked_numerator=scfg.get("masked_numerator", False), ema_decay=config.train.ema_decay,
        group_size=config.train.get("loss_group_size", 0),
    )  # fmt: skip


@dataclasses.dataclass
class StageResult:
    stage: str
    steps: int
    losses: list[float]  # per step, in order (for reports and tests)
    skipped: bool = False


def run_stage(
    config,
    stage: str,
    workdir: str,
    mesh,
    data_factory,
    eval_factory=None,
    notice: PreemptionNotice | None = None,
) -> StageResult:
    """Trains one stage to its configured number of steps, resuming where it stopped.

    `data_factory(stage)` gives the training Feed; `eval_factory()` a fresh validation Feed
    (read when the stage has `plateau_every` > 0: reduce-on-plateau on the validation loss).
    `notice`: the run's SIGTERM catcher (catflax.main holds one over all stages); without one
    the stage catches SIGTERM itself while it runs. A notice before the stage starts stops
    it there; one during its start-up or steps, at an agreed step after a checkpoint; one
    after its last batch, once its final parameters are saved. Each raises SystemExit(0)."""
    if notice is None:
        with PreemptionNotice() as notice:
            return run_stage(config, stage, workdir, mesh, data_factory, eval_factory, notice)
    spec = stages.stage_spec(stage)
    scfg = config[f"stage_{stage}"]
    plateau_every = scfg.get("plateau_every", 0)
    if plateau_every and (spec.step != "distill" or eval_factory is None):
        raise ValueError(
            f"stage_{stage}.plateau_every={plateau_every}: reduce-on-plateau needs the validation "
            "loss of stage 1a (distillation)" + ("" if eval_factory else " and a validation feed")
        )
    stage_dir = run_path(workdir, stage)
    if stage_finished(workdir, stage):
        logging.info("stage %s already finished; skipping", stage)
        return StageResult(stage, 0, [], skipped=True)
    if notice.agreed():  # a notice between stages, or before the first one
        logging.warning("stage %s: preempted (SIGTERM) before it started", stage)
        raise SystemExit(0)

    # ---------------------------------------------------------------- parameters
    graphdef, params, shardings = init_params(config, mesh)
    _test_signal(stage, "start")
    notes = load_pretrained(config, params, shardings) + merge_earlier_stages(
        workdir, stage, params
    )
    for note in notes:
        logging.info("stage %s: %s", stage, note)
    resume_checks.warn_missing_merges(config, workdir, stage, notes)
    model = nnx.merge(graphdef, params)
    graphdef, trainable, frozen = nnx.split(model, stages.trainable_filter(spec), ...)

    tx = optim.make_optimizer(optimizer_config(config, stage), trainable)
    step_cfg = step_config(config, stage)
    rng = jax.random.fold_in(jax.random.key(config.seed), stages.STAGE_ORDER.index(stage))
    ema = config.train.ema_decay > 0
    state = create_sharded_state(trainable, tx, rng, ema, shardings, mesh)
    del model, params, trainable  # the state holds its own copy: free the initial parameters

    # ---------------------------------------------------------------- data and resume
    data_iter = data_factory(stage)
    ckpt = Checkpointer(stage_dir / "checkpoints", keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    restore_data = config.train.get("restore_data", True)
    start_step = 0
    if latest is not None:
        saved = ckpt.saved_config(latest)
        resume_checks.check_resumable(saved, config, stage, ckpt.data_files(latest))
        if restore_data:
            resume_checks.warn_data_changes(saved, config, stage)
        like = abstract_state(state)  # the fresh state's layout; freed before the restore
        del state
        start_step, state = ckpt.restore(like, data_iter.checkpointable() if restore_data else None)
        logging.info("stage %s: resumed at step %d", stage, start_step)
        if not restore_data:
            logging.warning(
                "stage %s: train.restore_data=False: the data stream starts afresh (examples "
                "seen before step %d may come again)", stage, start_step,
            )  # fmt: skip
    if start_step >= scfg.steps:  # stopped after its last checkpoint, before the final save
        ckpt.close()
        save_final(workdir, stage, _handed_over(state, config))
        logging.info("stage %s: last step's checkpoint restored; final parameters saved", stage)
        return StageResult(stage, 0, [])

    # ---------------------------------------------------------------- compile
    batch = data_iter.next_global(mesh, {PREEMPT_KEY: notice.requested})
    state_sh, frozen_sh = sharding_of(state), sharding_of(frozen)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    step_fn = jit_step(graphdef, tx, step_cfg, state_sh, frozen_sh, batch_sh)
    compiled = step_fn.lower(state, frozen, batch).compile()
    flops = 0.0  # per device; only for MFU, so only counted where the device's peak is known
    if peak_flops_per_device(config.train.peak_flops_per_device):
        flops = step_flops_per_device(compiled, graphdef, tx, step_cfg, state, frozen, batch)
        logging.info("stage %s: %.3g GFLOP/step/device", stage, flops / 1e9)
    logging.info("stage %s: compiled step, memory %s", stage, _memory(compiled))

    validation = jit_validation(graphdef, step_cfg) if plateau_every else None

    # ---------------------------------------------------------------- loop
    writer = MetricWriter(stage_dir / "tensorboard", scfg.steps, stage, first_step=start_step)
    losses: list[float] = []
    pending = None  # (step, metrics) fetched one step late
    last_time = time.time()
    global_batch = batch[next(iter(batch))].shape[0]
    step = start_step
    kill_at = int(os.environ.get("CATFLAX_TEST_KILL_AT_STEP", "0"))  # resume tests only
    try:
        while step < scfg.steps:
            if step + 1 == kill_at:  # a hard kill once the last checkpoint has landed
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            state, metrics = compiled(state, frozen, batch)
            step += 1
            preempted = False
            if pending is not None:  # the step before: the same values on every process
                values = _report(pending, writer, config, scfg, global_batch, flops, last_time)
                losses.append(values["loss"])
                preempted = values.get(PREEMPT_KEY, 0) > 0
                last_time = time.time()
            pending = (step, metrics, data_iter.skipped())
            if plateau_every and step % plateau_every == 0:  # before the checkpoint of this step
                state = validate(state, frozen, validation, scfg, eval_factory, mesh, writer, step)
            if step % config.train.checkpoint_every == 0 or step == scfg.steps or preempted:
                values = _report(pending, writer, config, scfg, global_batch, flops, last_time)
                losses.append(values["loss"])
                preempted = preempted or values.get(PREEMPT_KEY, 0) > 0
                pending = None
                ckpt.save(step, state, data_iter.checkpointable(), config)
                writer.flush()
                last_time = time.time()  # the next step's time leaves out the report and save
            if preempted:
                ckpt.wait()
                writer.close()
                logging.warning(
                    "stage %s: preempted (SIGTERM) at step %d; checkpoint saved", stage, step
                )
                raise SystemExit(0)
            every = config.train.sample_every
            at_end = step == scfg.steps and every >= 0
            if spec.step == "denoise" and (at_end or (every > 0 and step % every == 0)):
                write_sample_grid(graphdef, state.params, frozen, config, writer, step,
                                  stage_dir / "samples" / f"{step}.png",
                                  mesh=mesh)  # fmt: skip
                last_time = time.time()
            if step < scfg.steps:
                batch = data_iter.next_global(mesh, {PREEMPT_KEY: notice.requested})
    except NonFiniteLossError:
        ckpt.wait()  # the last good checkpoint lands before the run stops
        writer.close()
        raise
    ckpt.wait()
    ckpt.close()
    _test_signal(stage, "final")
    save_final(workdir, stage, _handed_over(state, config))
    writer.close()
    # A notice after the last batch went out reached no step: the stage is finished, so stop
    # here (all processes agree) instead of starting the next one.
    if notice.agreed():
        logging.warning("stage %s: preempted (SIGTERM) after its last step; stage finished", stage)
        raise SystemExit(0)
    return StageResult(stage, step - start_step, losses)


def _test_signal(stage: str, point: str) -> None:
    """Preemption tests only: CATFLAX_TEST_TERM_AT=<stage>:<start|final> sends this process a
    SIGTERM during that stage's start-up (after the model is built) or before its final save."""
    if os.environ.get("CATFLAX_TEST_TERM_AT") == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGTERM)


def _handed_over(state, config) -> nnx.State:
    """What the next stage and the export get: the parameters, or their EMA if so configured."""
    if state.ema is None or not config.train.export_ema:
        return state.params
    return jax.tree.map(lambda e, p: e.astype(p.dtype), state.ema, state.params)  # float32 EMA


def _report(pending, writer, config, scfg, global_batch, flops, since) -> dict[str, float]:
    """Checks, records and (every log_every steps) prints one step's metrics; returns them."""
    step, metrics, skipped = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # The loss comes from the parameters before the step's update, the gradient norm from the
    # update itself: a finite loss with a non-finite gradient still spoils this step's state.
    for name in ("loss", "grad_norm"):
        if name in values and not np.isfinite(values[name]):
            raise NonFiniteLossError(
                f"{name} is {values[name]} at step {step}; stopping before that step's "
                "checkpoint. The latest checkpoint holds the parameters this step started from "
                "(they may be what diverged): to resume from an earlier one, delete the newer "
                "step folders under <workdir>/<stage>/checkpoints (train.keep_checkpoints are kept)"
            )
    dt = max(time.time() - since, 1e-9)
    peak = peak_flops_per_device(config.train.peak_flops_per_device)
    scale = values.get("lr_scale", 1.0)  # reduce-on-plateau's factor
    values.update(
        step_time_s=dt, examples_per_s=global_batch / dt,
        lr_fast=optim.learning_rate(scfg.lr_fast, scfg.warmup_steps, step - 1) * scale,
        lr_slow=optim.learning_rate(scfg.lr_slow, scfg.warmup_steps, step - 1) * scale,
    )  # fmt: skip
    if peak and flops:  # flops and peak are per device
        values["mfu"] = flops / dt / peak
    console = step % config.train.log_every == 0 or step == scfg.steps
    if console:  # every process skips its own records: summed over them (a host collective)
        values["skipped_examples"] = float(sum_over_processes(skipped))
    writer.record(step, values)  # every step, to metrics.jsonl
    if console:
        writer.scalars(step, values)
    return values


def validate(state, frozen, validation, scfg, eval_factory, mesh, writer, step):
    """The validation loss, fed to reduce-on-plateau; returns the state with the new PlateauState.

    The loss of each of the first `plateau_eval_batches` batches of a fresh validation feed (0:
    the whole split) over its valid examples, averaged with those counts as weights. Logged to
    TensorBoard, the console and <stage>/validation.jsonl."""
    feed, limit = eval_factory(), scfg.get("plateau_eval_batches", 0)
    total = count = 0.0
    batches = 0
    while not limit or batches < limit:
        try:
            batch = feed.next_global(mesh)
        except StopIteration:
            break
        loss_sum, valid = jax.device_get(validation(state.params, frozen, batch))
        total, count, batches = total + float(loss_sum), count + float(valid), batches + 1
    if count == 0:
        raise ValueError(f"step {step}: the validation split gave no valid examples")
    plateau_cfg = optim.PlateauConfig(
        factor=scfg.get("plateau_factor", 0.1), patience=scfg.get("plateau_patience", 2),
        threshold=scfg.get("plateau_threshold", 1e-4),
    )  # fmt: skip
    old = optim.plateau_state(state.opt_state)
    # out_shardings: the compiled train step takes its state only in the shardings it was built for
    observe = jax.jit(
        optim.observe_validation_loss, static_argnums=2, out_shardings=sharding_of(old)
    )
    new = observe(old, total / count, plateau_cfg)
    values = dict(val_loss=total / count, lr_scale=float(jax.device_get(new.scale)),
                  val_batches=batches)  # fmt: skip
    writer.record(step, values, name="validation")
    writer.scalars(step, values)
    logging.info("step %d: validation loss %.5g over %d batches; learning-rate scale %g", step,
                 values["val_loss"], batches, values["lr_scale"])  # fmt: skip
    return state.replace(opt_state=optim.with_plateau_state(state.opt_state, new))


def _memory(compiled) -> str:
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes  # the donated state is both an argument and an output
        )  # fmt: skip
        return f"{total / 2**30:.2f} GiB per device"
    except Exception:  # not every backend reports it
        return "n/a"
