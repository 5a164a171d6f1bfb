"""catflax entry point: `python -m catflax.main --config=configs/demo.py --workdir=DIR`.

`--config.field=value` overrides any config field; an unknown field is an error.
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from catflax import paths

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for this run.")
flags.mark_flags_as_required(["config", "workdir"])


PARTS = ("clip_text", "clip_vision", "vae", "unet", "inpainter")


def report_sizes(config) -> dict[str, int]:
    """Prints the parameter count of every part, from an abstract model (nothing allocated)."""
    from catflax.models.unet import adapter_param_count
    from catflax.train.loop import abstract_model
    from catflax.weights.convert import count_params

    model, counts = abstract_model(config), {}
    for part in PARTS:
        module = getattr(model, part)
        counts[part] = count_params(module)
        extra = ""
        if part == "unet" and module.config.ref_adapter:
            extra = f" (reference adapter {adapter_param_count(module):,})"
        print(f"{part}: {counts[part]:,} parameters{extra}  {dataclasses.asdict(module.config)}")
    return counts


def check_config(config) -> None:
    """Training settings the trainer cannot run with, refused before anything is built."""
    from catflax import sharding
    from catflax.models.cat import ConfigError

    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        value = config.train[name]
        if value < 1:  # keep_checkpoints=0 would have orbax delete every checkpoint it saves
            raise ConfigError(f"config.train.{name}={value} must be at least 1")
    group, batch = config.train.get("loss_group_size", 0), config.train.batch_size
    if group < 0 or (group and batch % group):
        raise ConfigError(
            f"config.train.loss_group_size={group} must be 0 or divide train.batch_size={batch}"
        )
    if config.report.enabled:  # run after the last stage: its settings are checked now
        from catflax import report

        try:
            report.check_config(config)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    try:
        rules = sharding.normalize_rules(dict(config.sharding_rules))
    except ValueError as e:
        raise ConfigError(f"config.sharding_rules: {e}") from e
    logging.info("sharding rules: %s", rules)


def check_batch_sizes(config, mesh, process_count: int) -> None:
    """The global training batch, and the validation batch where a stage validates, must split
    evenly over the mesh's batch axes: refused here, not at the first step or validation."""
    from catflax import sharding
    from catflax.models.cat import ConfigError

    shards = sharding.batch_shards(mesh)
    batches = {"train.batch_size (global)": config.train.batch_size}
    if any(config[f"stage_{s}"].get("plateau_every", 0) > 0 for s in config.stages):
        batches["data.eval_batch_size x processes"] = config.data.eval_batch_size * process_count
    for name, size in batches.items():
        if size % shards:
            raise ConfigError(
                f"config.{name} = {size} does not split over the mesh's {shards} batch shards "
                f"({' x '.join(sharding.BATCH_AXES)}); make it a multiple of {shards}"
            )


def train_and_evaluate(config, workdir: str) -> None:
    """Runs the configured training stages in order, each resuming where it stopped."""
    import jax

    from catflax import distributed, sharding
    from catflax.weights import pretrained

    check_config(config)
    report_sizes(config)
    if config.dry_run:
        return
    pretrained.check_training_weights(config.weights)
    mesh = sharding.make_mesh(dict(config.mesh))
    distributed.log_mesh(mesh)
    check_batch_sizes(config, mesh, jax.process_count())
    if jax.process_index() == 0:  # the run's config, for catflax.export
        from etils import epath

        epath.Path(workdir, "config.json").write_text(config.to_json_best_effort(indent=2))
    with jax.set_mesh(mesh):  # the current mesh: Pallas kernels (splash) shard_map over it
        _run_stages(config, workdir, mesh)
    if config.report.enabled:  # the demo: export, sample grid, loss and colour report
        from catflax import report

        if jax.process_count() == 1:
            report.run(config, workdir, mesh)
        else:
            logging.warning("report skipped: it runs in single-process runs only")


def _run_stages(config, workdir: str, mesh) -> None:
    from catflax.data.feed import Feed
    from catflax.train.loop import run_stage
    from catflax.train.preemption import PreemptionNotice

    with PreemptionNotice() as notice:  # SIGTERM from the first stage's start to the last's end
        for stage in config.stages:
            result = run_stage(config, stage, workdir, mesh, lambda _: Feed.from_config(config),
                               lambda: Feed.from_config(config, "eval"), notice)  # fmt: skip
            _print_done(stage, result, workdir)


def _print_done(stage: str, result, workdir: str) -> None:
    import jax

    if result.skipped:
        return
    if not result.losses:  # resumed at its last step
        print(f"stage {stage} done: process {jax.process_index()}, resumed at its last "
              "step; final parameters saved", flush=True)  # fmt: skip
    else:
        first, last = result.losses[0], result.losses[-1]
        print(f"stage {stage} done: process {jax.process_index()}, {result.steps} steps, "
              f"loss {first:.4g} (first step) -> {last:.4g} (last); per step: "
              f"{os.path.join(workdir, stage, 'metrics.jsonl')}", flush=True)  # fmt: skip


class _LibraryChatter(pylogging.Filter):
    """Drops INFO records of orbax and TFDS (a line per checkpoint file and dataset open);
    their warnings and errors still show. `--verbosity=1` shows everything."""

    QUIET = ("/orbax/", "/tensorflow_datasets/", "/grain/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno > pylogging.INFO or logging.get_verbosity() > logging.INFO:
            return True
        return not any(q in record.pathname for q in self.QUIET)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for an override of a field the config lacks:
    `catflax: unknown config field 'step' in --config.stage_1b.step=3 (did you mean 'steps'?)`."""
    import re

    overrides = [a for a in argv[1:] if a.startswith("--config.")]

    def culprit(e: BaseException, field: str | None = None) -> str:
        """The override that failed: ml_collections applies them in turn, the one at hand in
        its `field_path`; else the first with `field` in its path; else all of them."""
        tb = e.__traceback__
        while tb is not None:
            path = tb.tb_frame.f_locals.get("field_path")
            named = [a for a in overrides if a.partition("=")[0] == f"--config.{path}"]
            if isinstance(path, str) and named:
                return named[0]
            tb = tb.tb_next
        named = [a for a in overrides if field in a.partition("=")[0].split(".")[1:]]
        return named[0] if named else " ".join(overrides or argv[1:])

    try:
        remaining = flags.FLAGS(argv)
        # ml_collections defers a config file's load error to the config's first use: here.
        getattr(_CONFIG.value, "lock", None)
        return remaining
    except OSError as e:  # "Failed loading config file ...\n  Attempted ...\n      [Errno 2] ..."
        lines = str(e.__cause__ or e).strip().splitlines()
        sys.exit(f"catflax: cannot load the config file: {lines[-1].strip()}")
    except (AttributeError, KeyError) as e:
        # ml_collections raises AttributeError(KeyError("'step'\nDid you mean \"steps\" ...")),
        # or a KeyError("Attribute <class 'int'>.deep does not exist ... lookup: a.b.deep").
        err = e
        while err.args and isinstance(err.args[0], AttributeError | KeyError):
            err = err.args[0]
        text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        first, _, rest = text.partition("\n")
        field = first.strip("\"'")
        if not field.isidentifier():
            sys.exit(f"catflax: {culprit(e)}: {first}")
        hint = re.search(r'Did you mean "([^"]+)"', rest)
        sys.exit(
            f"catflax: unknown config field {field!r} in {culprit(e, field)}"
            + (f" (did you mean {hint[1]!r}?)" if hint else "")
        )
    except TypeError as e:  # a path through a value that is not a config (a tuple, ...)
        sys.exit(f"catflax: {culprit(e)}: no such config field ({e})")
    except flags.Error as e:
        sys.exit(f"catflax: {e}")


def generated_data_dir(workdir: str) -> str:
    """Where a config with an empty data.data_dir keeps generated data: WORKDIR/data, or each
    host's ~/catflax-data when the workdir is on an object store (every host generates the
    same data; reading ArrayRecords from a bucket needs no copy per host, writing them does)."""
    if paths.is_remote(workdir):
        return os.path.expanduser("~/catflax-data")
    return os.path.join(workdir, "data")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from catflax import distributed

    logging.get_absl_handler().addFilter(_LibraryChatter())
    try:
        distributed.initialize_distributed()  # before anything else touches devices
    except distributed.ClusterConfigError as e:
        sys.exit(f"catflax: {e}")
    config = _CONFIG.value
    workdir = _WORKDIR.value
    if not paths.is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
    if not config.data.data_dir:  # generated data (the demo)
        with config.unlocked():
            config.data.data_dir = generated_data_dir(workdir)
    logging.info("config:\n%s", config)
    from catflax.models.cat import ConfigError
    from catflax.train.resume_checks import ResumeError

    try:
        train_and_evaluate(config, workdir)
    except ConfigError as e:  # a typed module config got a field it does not have
        sys.exit(f"catflax: bad config: {e}")
    except ResumeError as e:  # the checkpoint on disk does not fit this run
        sys.exit(f"catflax: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
