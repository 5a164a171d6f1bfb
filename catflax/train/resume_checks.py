"""Checks at a stage's start: parts that should come from earlier stages (SPEC.md §5's merge)
but did not, and a resume whose config changed what the data stream depends on."""

from __future__ import annotations

import json

import jax
from absl import logging

from catflax.train import stages


def warn_missing_merges(config, workdir: str, stage: str, notes: list[str]) -> None:
    """Warns when a part this stage uses should come from an earlier stage (SPEC.md §5's merge)
    that has not finished in this run directory (and config.weights.cat gives none)."""
    order, spec = stages.STAGE_ORDER, stages.STAGES[stage]
    used = {"inpainter": "inpainter" in spec.trains or spec.tokens == "inpainter",
            "unet": spec.step == "denoise"}  # fmt: skip
    for part, needed in used.items():
        trainers = [s for s in order[: order.index(stage)] if part in stages.STAGES[s].trains]
        if (
            not needed
            or not trainers
            or config.weights.cat
            or any(note.startswith(f"{part} from stage") for note in notes)
        ):
            continue
        frozen = "" if part in spec.trains else ", and it is frozen in this stage"
        logging.warning(
            "stage %s: the %s should come from stage %s, which has not finished in %s: it "
            "starts from config.weights (random where none is given)%s",
            stage, part, " or ".join(trainers), workdir, frozen,
        )  # fmt: skip


# What the data stream depends on: changed on a resume, the restored data position no longer
# continues the same stream (a deliberate change, e.g. a new batch size, is allowed; it is logged).
DATA_FIELDS = ("seed", "train.batch_size", "data.train_mixture", "data.train_split",
               "data.resolution", "data.clip_resolution")  # fmt: skip


def warn_data_changes(saved: dict | None, config, stage: str) -> None:
    """Warns about each DATA_FIELDS value that differs from the resumed checkpoint's config."""
    if saved is None:
        return
    now = json.loads(config.to_json_best_effort())
    for field in DATA_FIELDS:
        before, after = _get(saved, field), _get(now, field)
        if before != after:
            logging.warning(
                "stage %s: config.%s was %r when the checkpoint was saved and is %r now: the "
                "data no longer continues exactly where it stopped", stage, field, before, after
            )  # fmt: skip


class ResumeError(ValueError):
    """A stage's checkpoint cannot be resumed with this run's config or process count."""


# Settings that change the train state's structure (and so the checkpoint's): (config field,
# a description of the state it adds).
STATE_FIELDS = (
    ("optimizer.grad_clip_norm", "gradient clipping's state"),
    ("stage_{stage}.plateau_every", "reduce-on-plateau's state"),
    ("train.ema_decay", "the EMA"),
)


def check_resumable(saved: dict | None, config, stage: str, data_files: list[str]) -> None:
    """Refuses (ResumeError naming the field) a resume the checkpoint cannot serve: a setting
    that adds or removes part of the train state was turned on or off; or, when the data
    position is restored (`train.restore_data`), a different `data.num_workers` or process
    count (grain's position is per process and per worker layout). `data_files`: the names of
    the checkpoint's data-position files."""
    now = json.loads(config.to_json_best_effort())
    problems = []
    if saved is not None:
        for template, what in STATE_FIELDS:
            field = template.format(stage=stage)
            before, after = (_get(tree, field) for tree in (saved, now))
            before, after = (0 if v is None else v for v in (before, after))
            if (before > 0) != (after > 0):
                problems.append(
                    f"config.{field} was {before} and is {after} now: {what} is "
                    f"{'in' if before > 0 else 'not in'} the checkpoint; set it back to resume"
                )
    if config.train.get("restore_data", True):
        hint = (
            "; set it back, or pass --config.train.restore_data=False to restore the model and "
            "optimiser and restart the data stream"
        )
        workers = _get(saved, "data.num_workers") if saved is not None else None
        if workers is not None and workers != config.data.num_workers:
            problems.append(
                f"config.data.num_workers was {workers} and is {config.data.num_workers} now: "
                f"the saved data position is per worker{hint}"
            )
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if data_files and mine not in data_files:
            problems.append(
                f"the data position was saved by other processes ({sorted(data_files)[0]}, ...), "
                f"this is {mine.removesuffix('.json')}{hint}"
            )
    if problems:
        raise ResumeError(f"stage {stage}: cannot resume: " + "; ".join(problems))


def _get(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree
