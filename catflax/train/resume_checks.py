"""Checks at a stage's start: parts that should come from earlier stages (SPEC.md §5's merge)
but did not, and a resume whose config changed what the data stream depends on."""

from __future__ import annotations

import json

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

    def get(tree, dotted):
        for key in dotted.split("."):
            tree = tree.get(key) if isinstance(tree, dict) else None
        return tree

    for field in DATA_FIELDS:
        before, after = get(saved, field), get(now, field)
        if before != after:
            logging.warning(
                "stage %s: config.%s was %r when the checkpoint was saved and is %r now: the "
                "data no longer continues exactly where it stopped", stage, field, before, after
            )  # fmt: skip
