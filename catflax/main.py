"""catflax entry point: `python -m catflax.main --config=configs/demo.py --workdir=DIR`.

`--config.field=value` overrides any config field; an unknown field is an error.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for this run.")
flags.mark_flags_as_required(["config", "workdir"])


def build_towers(config, abstract: bool = False):
    """The frozen CLIP towers the config describes (loaded when it names weights)."""
    from flax import nnx

    from catflax.models import clip

    text_cfg = clip.CLIPTextConfig(**config.model.clip_text)
    vision_cfg = clip.CLIPVisionConfig(**config.model.clip_vision)
    if config.weights.clip and not abstract:
        text = clip.CLIPTextModel.from_pretrained(
            config.weights.clip, dtype=text_cfg.dtype, param_dtype=text_cfg.param_dtype
        )
        vision = clip.CLIPVisionModel.from_pretrained(
            config.weights.clip, dtype=vision_cfg.dtype, param_dtype=vision_cfg.param_dtype
        )
        return text, vision
    make = nnx.eval_shape if abstract else (lambda f: f())
    rngs = lambda: nnx.Rngs(config.seed)  # noqa: E731
    text = make(lambda: clip.CLIPTextModel(text_cfg, rngs=rngs()))
    vision = make(lambda: clip.CLIPVisionModel(vision_cfg, rngs=rngs()))
    return text, vision


def train_and_evaluate(config, workdir: str) -> None:
    """Runs what the config asks for. For now: build the frozen towers and report their sizes."""
    from catflax.weights.convert import count_params

    text, vision = build_towers(config, abstract=config.dry_run)
    for name, model in (("clip_text", text), ("clip_vision", vision)):
        sizes = dataclasses.asdict(model.config)
        print(f"{name}: {count_params(model):,} parameters  {sizes}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for an override of a field the config lacks."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        field = str(e).strip("\"'")
        bad = [a for a in argv if a.startswith("--config.") and field in a.split("=")[0]]
        sys.exit(f"catflax: unknown config field {field!r} in {' '.join(bad) or argv[1:]}")
    except flags.Error as e:
        sys.exit(f"catflax: {e}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    workdir = _WORKDIR.value
    if not workdir.startswith("gs://"):
        os.makedirs(workdir, exist_ok=True)
    logging.info("config:\n%s", config)
    try:
        train_and_evaluate(config, workdir)
    except TypeError as e:  # a typed module config got a field it does not have
        raise app.UsageError(f"bad model config: {e}") from e


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
