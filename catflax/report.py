"""The end-of-run report (the demo's): an inference export, a sample grid and a printed summary
of the loss curves and a colour check on held-out synthetic images.

The colour check inpaints held-out synthetic_shapes images whose whole object is masked (the
object mask dilated 5x5, as in training), prompting "a {colour} {shape}" with a colour *other*
than the hidden object's, and counts how often the prompted colour is the dominant colour inside
the mask. Copying the context cannot pass it: the original colour is both hidden and wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from catflax.data import geometry, records, sources, synthetic
from catflax.paths import copy_tree, is_remote
from catflax.train import stages

LOSS_NAMES = {"distill": "distillation", "denoise": "denoising"}


# ============================================================================ loss curves
@dataclasses.dataclass(frozen=True)
class LossCurve:
    """Mean loss over the first and the last `fraction` of a stage's steps."""

    stage: str
    kind: str  # "distillation" | "denoising"
    steps: int
    first: float
    last: float

    @property
    def fell(self) -> bool:
        return self.last < self.first


def loss_curve(workdir: str, stage: str, fraction: float = 0.1) -> LossCurve:
    """From WORKDIR/<stage>/metrics.jsonl (one line per step; a resumed step counts once)."""
    path = epath.Path(workdir) / stage / "metrics.jsonl"  # local or gs://
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics for stage {stage} (did it run?)")
    by_step = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_step[int(row["step"])] = float(row["loss"])  # a re-run step: the latest value
    if not by_step:
        raise ValueError(f"{path}: no steps recorded")
    losses = np.asarray([by_step[s] for s in sorted(by_step)])
    n = max(1, round(len(losses) * fraction))
    kind = LOSS_NAMES[stages.stage_spec(stage).step]
    return LossCurve(stage, kind, len(losses), float(losses[:n].mean()), float(losses[-n:].mean()))


# ============================================================================ colour check
@dataclasses.dataclass(frozen=True)
class ColourExample:
    image: np.ndarray  # (H, W, 3) uint8, the held-out image
    mask: np.ndarray  # (H, W) uint8 0/255: the object, dilated 5x5
    colour: str  # the hidden object's colour
    prompt_colour: str  # a different colour
    prompt: str  # "a {prompt_colour} {shape}"


@dataclasses.dataclass(frozen=True)
class ColourCheck:
    accuracy: float  # prompted colour dominant inside the mask
    copied: float  # the hidden original colour dominant instead
    examples: int
    colours: int  # chance is 1 / colours
    leaked_pixels: int  # original-colour pixels left in the masked model inputs (should be 0)
    dominant: tuple[str | None, ...] = ()  # per example: the dominant colour in the mask

    @property
    def chance(self) -> float:
        return 1.0 / self.colours


def colour_examples(
    name: str, split: str, data_dir: str, count: int, colours: Sequence[str] | None = None
) -> list[ColourExample]:
    """The first `count` records of a synthetic_shapes split, each prompted with another colour
    (cycling over the other colours, so every prompt colour appears about equally)."""
    source = sources.open_tfds(name, split, data_dir)
    palette = list(colours or synthetic.COLOURS)
    if count > len(source):
        raise ValueError(f"{name}/{split} has {len(source)} examples, {count} asked for")
    out = []
    for i in range(count):
        record = source[i]
        image = np.asarray(records.decode_image(record["image"]))
        mask = records.decode_mask(record["mask"], (image.shape[1], image.shape[0]))
        label = records.text(record["label"])
        colour = synthetic.prompt_colour(label)
        if colour is None:
            raise ValueError(f"{name}/{split}[{i}]: label {label!r} names no colour")
        others = [c for c in palette if c != colour]
        prompt_colour = others[i % len(others)]
        article = "an" if prompt_colour[0] in "aeiou" else "a"
        shape = label.split()[-1]
        prompt = f"{article} {prompt_colour} {shape}"
        out.append(ColourExample(image, geometry.dilate(mask), colour, prompt_colour, prompt))
    return out


def _leaked_pixels(pipe, examples: Sequence[ColourExample]) -> int:
    """Pixels of the hidden colour in the masked inputs the model sees (VAE and CLIP sides)."""
    batch = pipe.prepare([(Image.fromarray(e.image), e.mask) for e in examples])
    masked512 = np.clip(np.round((batch["masked512"] + 1) * 127.5), 0, 255).astype(np.uint8)
    leaked = 0
    names = list(synthetic.COLOURS)
    for e, vae_in, clip_in in zip(examples, masked512, batch["masked224"]):
        index = names.index(e.colour)
        leaked += int((synthetic.colour_name_map(vae_in) == index).sum())
        leaked += int((synthetic.colour_name_map(clip_in) == index).sum())
    return leaked


def colour_check(
    pipe, examples: Sequence[ColourExample], seed: int = 0, batch_size: int = 32
) -> tuple[ColourCheck, list[np.ndarray]]:
    """Inpaints every example (seed + i) and scores it; returns the check and the samples."""
    samples: list[np.ndarray] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch size
        out = pipe(
            [Image.fromarray(e.image) for e in chunk], [e.mask for e in chunk],
            [e.prompt for e in chunk], seed=[seed + start + j for j in range(batch_size)],
        )  # fmt: skip
        samples += [np.asarray(o) for o in out]
    samples = samples[: len(examples)]
    dominant = [synthetic.dominant_colour(s, e.mask) for s, e in zip(samples, examples)]
    n = len(examples)
    check = ColourCheck(
        accuracy=sum(d == e.prompt_colour for d, e in zip(dominant, examples)) / n,
        copied=sum(d == e.colour for d, e in zip(dominant, examples)) / n,
        examples=n,
        colours=len({e.colour for e in examples} | {e.prompt_colour for e in examples}),
        leaked_pixels=_leaked_pixels(pipe, examples),
        dominant=tuple(dominant),
    )
    return check, samples


# ============================================================================ grid and report
def sample_grid(
    examples: Sequence[ColourExample], samples: Sequence[np.ndarray], side: int = 96
) -> np.ndarray:
    """(rows*side, 3*side, 3) uint8: masked input | mask | sample, one example per row; the
    prompt's colour word is written on the sample."""
    rows = []
    for e, sample in zip(examples, samples):
        keep = 1.0 - e.mask[..., None].astype(np.float32) / 255.0
        masked = (e.image * keep).astype(np.uint8)
        cells = [Image.fromarray(c).resize((side, side)) for c in (masked, e.mask, sample)]
        ImageDraw.Draw(cells[2]).text((2, 1), e.prompt_colour, fill=(255, 255, 255))
        rows.append(np.concatenate([np.asarray(c.convert("RGB")) for c in cells], 1))
    return np.concatenate(rows, 0)


def save_example(example: ColourExample, directory: str) -> dict[str, str]:
    """A held-out image and its mask as PNGs, for trying the export with catflax.inpaint."""
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"{k}.png") for k in ("image", "mask")}
    Image.fromarray(example.image).save(paths["image"])
    Image.fromarray(example.mask).save(paths["mask"])
    return paths | {"prompt": example.prompt}


def check_config(config) -> None:
    """Report settings it cannot run with (main can refuse them before training)."""
    for key in ("num_images", "batch_size", "grid_rows"):
        value = config.report[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.report.{key}={value!r} must be a positive integer")


def run(config, workdir: str, mesh) -> dict:
    """Writes WORKDIR/export (inference directory), WORKDIR/samples.png and WORKDIR/report.json,
    prints the report, and returns what report.json holds. A WORKDIR on an object store gets
    them written locally first and copied."""
    check_config(config)
    out = tempfile.mkdtemp(prefix="catflax-report-") if is_remote(workdir) else workdir
    try:
        summary = _write_report(config, workdir, out, mesh)
        if out != workdir:
            copy_tree(out, workdir)
    finally:
        if out != workdir:
            shutil.rmtree(out, ignore_errors=True)
    return summary


def _write_report(config, workdir: str, out: str, mesh) -> dict:
    """The report's files written under `out`; the paths it names are under `workdir`."""
    from catflax import export
    from catflax.pipeline import CATPipeline

    def final(path: str) -> str:  # where a file written under `out` ends up
        return path if out == workdir else f"{workdir.rstrip('/')}/{os.path.relpath(path, out)}"

    def here(path: str) -> str:  # how the "try it" line names it (copied to the current folder)
        return path if out == workdir else os.path.relpath(path, out)

    lines, summary = ["", "=" * 32 + " report " + "=" * 32], {"losses": {}}
    for stage in config.stages:
        curve = loss_curve(workdir, stage)
        summary["losses"][stage] = dataclasses.asdict(curve) | {"fell": curve.fell}
        lines.append(
            f"stage {stage}: {curve.kind} loss, mean of the first 10% of {curve.steps} steps "
            f"{curve.first:.4f} -> last 10% {curve.last:.4f} "
            + ("(fell)" if curve.fell else "(DID NOT FALL)")
        )
    model, _, _ = export.load_run(workdir, mesh=mesh)  # the last stage, as the run merged it
    pipe = CATPipeline.from_model(
        model, resolution=config.data.resolution, sampling=dict(config.sampling)
    )
    pipe.save_pretrained(os.path.join(out, "export"))
    summary["export"] = final(os.path.join(out, "export"))
    name = sources.parse_mixture(config.data.eval_mixture)[0][0]
    if name.split("/")[0] == "synthetic_shapes":
        rcfg = config.report
        examples = colour_examples(
            name, config.data.eval_split, config.data.data_dir, rcfg.num_images
        )
        check, samples = colour_check(pipe, examples, seed=config.seed, batch_size=rcfg.batch_size)
        summary["colour_check"] = dataclasses.asdict(check) | {"chance": check.chance}
        lines.append(
            f"colour check, {check.examples} held-out images, whole object masked, prompted with "
            f"another colour: the prompted colour is dominant in the mask in {check.accuracy:.1%}"
            f" (chance {check.chance:.1%}); the hidden original colour in {check.copied:.1%}; "
            f"original-colour pixels visible to the model: {check.leaked_pixels}"
        )
        grid = sample_grid(examples[: rcfg.grid_rows], samples[: rcfg.grid_rows])
        Image.fromarray(grid).save(os.path.join(out, "samples.png"))
        summary["samples"] = final(os.path.join(out, "samples.png"))
        lines.append(f"sample grid (masked input | mask | sample): {summary['samples']}")
        example = save_example(examples[0], os.path.join(out, "example"))
        summary["example"] = {k: final(v) if k != "prompt" else v for k, v in example.items()}
    lines.append(f"inference export: {summary['export']}")
    if "example" in summary:
        if out != workdir:  # catflax.inpaint reads local files: copy them first
            lines.append(
                f"copy them here: gcloud storage cp -r {summary['export']} "
                f"{final(os.path.join(out, 'example'))} ."
            )
        lines.append(
            f"try it: python -m catflax.inpaint --weights={here(os.path.join(out, 'export'))} "
            f"--image={here(example['image'])} --mask={here(example['mask'])} "
            f'--prompt="{example["prompt"]}" --out={here(os.path.join(out, "example", "out.png"))}'
        )
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n".join(lines), flush=True)
    return summary
