r"""Evaluate a model on a prepared dataset: generate; write images, metrics and a contact sheet.

    python -m catflax.evaluate --weights=PIPELINE_DIR --dataset=coco_inpaint --split=validation \
        --num=1000 --masks=box --out=eval/ [--clip=clip-vit-large-patch14] \
        [--inception=fid_inception.safetensors] [--data_dir=~/tensorflow_datasets] \
        [--batch_size=16] [--num_steps=50] [--guidance_scale=7.5] [--seed=0]

Examples are the first `--num` object examples of the split, in order (text-image pairs, records
that do not decode and masks that vanish at the model resolution are skipped and counted).
`--masks=seg` uses the object mask, resized to the model resolution and given to the model soft
(SPEC.md §4 evaluation); `--masks=box` the record's stored box (else the mask's extent) drawn at
the model resolution, as the reference's box evaluation. Images are resized the same way;
example i is generated with seed
`--seed + i` and classifier-free guidance in one batch, each batch split over all local devices
with the model replicated; the result is pasted back (outside the mask exactly the input).

OUT/ gets images/ (generated), inputs/ (the input at the model resolution: the reference set of
FID/CMMD), masks/ (the binary mask), all PNG; metrics.json (preservation always; CLIP score,
CLIP-FD and CMMD with --clip; FID with --inception; docs/EVALUATION.md; `warnings` for FID and
CLIP-FD from no more images than features); contact_sheet.png and index.html (input, mask,
prompt, output).
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from catflax.data.eval_examples import MASK_KINDS, Example, iter_examples

_NUMBERED = re.compile(r"\d{5,}\.png")  # images/, inputs/, masks/ files of a run
SHEET_CELL = (128, 256)  # contact sheet cells: model images scaled into this range of sides


@dataclasses.dataclass
class Options:
    weights: str | None = None
    dataset: str | None = None
    split: str = "validation"
    num: int = 100
    masks: str = "seg"
    out: str | None = None
    clip: str | None = None
    inception: str | None = None
    data_dir: str = ""
    batch_size: int = 16
    num_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    paste_back: bool = True
    dtype: str = "float32"
    resolution: int | None = None
    sheet_rows: int = 16
    allow_pickle: bool = False

    @classmethod
    def from_flags(cls, fv: flags.FlagValues) -> Options:
        return cls(**{f.name: fv[f.name].value for f in dataclasses.fields(cls)})


_FLAGS = (  # (define, name, default, help)
    (flags.DEFINE_string, "weights", None, "catflax export directory or CAT checkpoint file"),
    (flags.DEFINE_string, "dataset", None, "prepared TFDS dataset (e.g. coco_inpaint)"),
    (flags.DEFINE_string, "split", "validation", "dataset split"),
    (flags.DEFINE_integer, "num", 100, "number of examples (the first ones with a mask)"),
    (flags.DEFINE_string, "masks", "seg", "seg: the object mask; box: its filled bounding box"),
    (flags.DEFINE_string, "out", None, "output directory"),
    (flags.DEFINE_string, "clip", None, "transformers CLIPModel dir: CLIP score, CLIP-FD, CMMD"),
    (flags.DEFINE_string, "inception", None, "FID Inception weights (.safetensors or .pth)"),
    (flags.DEFINE_string, "data_dir", "", "TFDS data_dir ('' = TFDS default)"),
    (flags.DEFINE_integer, "batch_size", 16, "examples per model call (rounded up to devices)"),
    (flags.DEFINE_integer, "num_steps", None, "DDIM steps (default: the pipeline's, 50)"),
    (flags.DEFINE_float, "guidance_scale", None, "classifier-free guidance (default 7.5)"),
    (flags.DEFINE_integer, "seed", 0, "example i uses seed + i"),
    (flags.DEFINE_bool, "paste_back", True, "keep pixels outside the mask exactly the input's"),
    (flags.DEFINE_string, "dtype", "float32", "compute dtype: float32 or bfloat16"),
    (flags.DEFINE_integer, "resolution", None, "model image side (default: the pipeline's)"),
    (flags.DEFINE_integer, "sheet_rows", 16, "examples on contact_sheet.png (index.html: all)"),
    (flags.DEFINE_bool, "allow_pickle", False, "allow pickled weight files (runs code)"),
)


def _flag_values() -> flags.FlagValues:
    """The command's flags on a private FlagValues (no clash with other CLIs)."""
    fv = flags.FlagValues()
    for define, name, default, help_ in _FLAGS:
        define(name, default, help_, flag_values=fv)
    return fv


def parse(argv: Sequence[str]) -> Options:
    """Options from command-line arguments."""
    fv = _flag_values()
    fv(["evaluate", *argv])
    return Options.from_flags(fv)


# ---------------------------------------------------------------------------------------------
# Generation, sharded over the local devices
# ---------------------------------------------------------------------------------------------


class ShardedSampler:
    """CATPipeline sampling with the model replicated on a mesh of the local devices and every
    batch split over them (jax.jit follows the inputs' shardings)."""

    def __init__(self, pipe, devices=None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from catflax.tokenizer import tokenize

        self.pipe = pipe
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.asarray(self.devices), ("data",))
        self.state = jax.device_put(pipe.state, NamedSharding(self.mesh, PartitionSpec()))
        self._split = lambda a: jax.device_put(
            a, NamedSharding(self.mesh, PartitionSpec("data", *([None] * (a.ndim - 1))))
        )
        length = pipe.model.config.clip_text.max_positions
        self.empty_ids = tokenize([""], pipe.tokenizer, length)[0]
        self.tokenize = lambda prompts: tokenize(list(prompts), pipe.tokenizer, length)

    def batch_size(self, wanted: int) -> int:
        """`wanted` rounded up to a multiple of the device count."""
        n = len(self.devices)
        return max(1, math.ceil(wanted / n)) * n

    def sample_on_devices(self, batch, seeds, num_steps=None, guidance_scale=None, eta=None):
        """(B,R,R,3) uint8 samples as a jax.Array split over the devices, as
        `CATPipeline.sample` computes them (B a multiple of the device count)."""
        from catflax import pipeline as pipeline_lib

        s = self.pipe.sampling
        num_steps = s.num_steps if num_steps is None else int(num_steps)
        guidance = s.guidance_scale if guidance_scale is None else float(guidance_scale)
        eta = float(s.eta if eta is None else eta)
        ids = np.asarray(batch["input_ids"], np.int32)
        if len(ids) % len(self.devices) or len(seeds) != len(ids):
            raise ValueError(
                f"batch {len(ids)}, seeds {len(seeds)}: need equal multiples of "
                f"{len(self.devices)} devices"
            )
        inputs = {k: np.asarray(batch[k]) for k in ("masked512", "masked224", "mask64", "mask16")}
        inputs.update(input_ids=ids, empty_ids=np.broadcast_to(self.empty_ids, ids.shape),
                      seeds=np.asarray(seeds, np.uint32))  # fmt: skip
        return pipeline_lib._generate(
            self.pipe.graphdef, self.state, {k: self._split(v) for k, v in inputs.items()},
            np.float32(guidance), np.float32(eta), num_steps=num_steps, stochastic=eta > 0,
            guided=guidance != 1.0,
        )  # fmt: skip

    def __call__(self, batch, seeds, num_steps=None, guidance_scale=None, eta=None) -> np.ndarray:
        """The samples of `sample_on_devices` as one host numpy array."""
        import jax

        images = self.sample_on_devices(batch, seeds, num_steps, guidance_scale, eta)
        return np.asarray(jax.device_get(images))


def generate(
    sampler: ShardedSampler, examples: Iterable[Example], opts: Options, report=print
) -> Iterator[tuple[list[Example], np.ndarray]]:
    """(examples, their generated (n,R,R,3) uint8 images) batch by batch, pasted back if
    opts.paste_back; example i (in order) gets seed opts.seed + i."""
    size = sampler.batch_size(opts.batch_size)
    examples, done = iter(examples), 0
    while chunk := list(itertools.islice(examples, size)):
        padded = chunk + [chunk[0]] * (size - len(chunk))  # one compiled batch size for all
        batch = sampler.pipe.prepare([(Image.fromarray(e.image), e.model_mask) for e in padded])
        batch["input_ids"] = sampler.tokenize([e.prompt for e in padded])
        seeds = [opts.seed + done + i for i in range(len(chunk))]
        seeds += [seeds[0]] * (size - len(chunk))  # the padding's: in range like the real ones
        images = sampler(batch, seeds, opts.num_steps, opts.guidance_scale)[: len(chunk)]
        if opts.paste_back:
            images = np.stack([np.where(e.mask[..., None] > 127, image, e.image)
                               for e, image in zip(chunk, images)])  # fmt: skip
        done += len(chunk)
        report(f"evaluate: generated {done}/{opts.num}")
        yield chunk, images.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def sample_size_warnings(count: int, feature_dims: dict[str, int]) -> list[str]:
    """metrics.json's warnings for Frechet distances (name -> feature size) from `count` images
    per set: none below 2 (no covariance), singular covariances up to the feature size."""
    out = []
    for name, dim in feature_dims.items():
        if count < 2:
            out.append(f"{name} needs at least 2 images (a covariance): null")
        elif count <= dim:
            out.append(
                f"{name} from {count} images per set, not more than its {dim} feature dimensions:"
                f" the covariances are singular (rank {count - 1}) and {name} is biased upwards"
                " at small N; compare only values at equal N (docs/EVALUATION.md)"
            )
    return out


def _finite_or_none(value):
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def contact_sheet(
    inputs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    generated: Sequence[np.ndarray],
    prompts: Sequence[str],
    rows: int,
) -> Image.Image:
    """Rows of input | mask | output, with the prompt above each row."""
    rows = min(rows, len(prompts))
    inputs, masks, generated = inputs[:rows], masks[:rows], generated[:rows]
    cell = min(max(inputs[0].shape[0], SHEET_CELL[0]), SHEET_CELL[1])
    text_h = 14
    sheet = Image.new("RGB", (3 * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (image_in, mask, image) in enumerate(zip(inputs, masks, generated)):
        y = r * (cell + text_h)
        draw.text((2, y + 1), f"{r}: {prompts[r]}"[:80], fill="black")
        for c, a in enumerate((image_in, np.repeat(mask[..., None], 3, -1), image)):
            sheet.paste(Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST),
                        (c * cell, y + text_h))  # fmt: skip
    return sheet


def write_index_html(path: str, rows: list[dict], summary: dict) -> None:
    """One table row per example: number, input, mask, prompt, output, its metrics."""
    metric = ("_outside", "clip_score", "clip_score_crop")
    cells = "\n".join(
        f"<tr><td>{r['number']}</td><td><img src='{r['input']}'></td><td><img src='{r['mask']}'>"
        f"</td><td>{html.escape(r['prompt'])}</td><td><img src='{r['image']}'></td><td>"
        + html.escape(json.dumps({k: r[k] for k in r if k.endswith(metric)}))
        + "</td></tr>"
        for r in rows
    )
    metrics = html.escape(json.dumps(summary, indent=1))
    with open(path, "w") as f:
        f.write(
            "<!doctype html><meta charset='utf-8'><title>catflax evaluation</title>"
            "<style>img{width:192px;image-rendering:pixelated}td{vertical-align:top}</style>"
            f"<pre>{metrics}</pre><table><tr><th>#</th><th>input</th><th>mask</th>"
            f"<th>prompt</th><th>output</th><th>metrics</th></tr>\n{cells}\n</table>\n"
        )


def run(opts: Options, pipeline=None, report=print) -> dict:
    """The whole evaluation (with `pipeline` if given); returns metrics.json's content."""
    import jax

    from catflax.data import sources
    from catflax.metrics import CLIPScorer, InceptionV3, compute_metrics
    from catflax.metrics.distances import SmallSampleWarning
    from catflax.metrics.image_sets import ImageFiles
    from catflax.metrics.inception import FEATURE_DIM
    from catflax.paths import is_remote

    missing = [f"--{n}" for n in ("weights", "dataset", "out") if not getattr(opts, n)]
    if missing and not (pipeline is not None and missing == ["--weights"]):
        raise ValueError(f"missing {', '.join(missing)}")
    if opts.num < 1:
        raise ValueError(f"--num={opts.num} must be positive")
    if opts.sheet_rows < 1:
        raise ValueError(f"--sheet_rows={opts.sheet_rows} must be positive")
    if opts.batch_size < 1:
        raise ValueError(f"--batch_size={opts.batch_size} must be positive")
    if not 0 <= opts.seed <= 2**32 - opts.num:  # example i is sampled with seed + i, a uint32
        raise ValueError(
            f"--seed={opts.seed}: seed + i (i < --num={opts.num}) must be in [0, 2**32)"
        )
    if opts.out and is_remote(opts.out):  # os.makedirs would make a local folder "gs:"
        raise ValueError(f"--out={opts.out}: give a local folder (then copy it to the bucket)")
    if opts.out and os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise ValueError(f"--out={opts.out} is a file, not a folder")
    if opts.masks not in MASK_KINDS:
        raise ValueError(f"--masks={opts.masks!r}: choose one of {list(MASK_KINDS)}")
    if jax.process_count() > 1:
        raise ValueError("catflax.evaluate runs on one host (all its local devices)")
    if pipeline is None:
        from catflax.pipeline import CATPipeline

        towers = None if os.path.isdir(opts.weights) else opts.clip  # --clip: metrics, too
        pipeline = CATPipeline.from_pretrained(
            opts.weights, clip_path=towers, dtype=opts.dtype, resolution=opts.resolution,
            allow_pickle=opts.allow_pickle,
        )  # fmt: skip
    # Metric models first, so that a bad path fails before the generation.
    clip = (
        CLIPScorer.from_pretrained(opts.clip, allow_pickle=opts.allow_pickle) if opts.clip else None
    )
    inception = None
    if opts.inception:
        inception = InceptionV3.from_pretrained(opts.inception, allow_pickle=opts.allow_pickle)
    source = sources.open_tfds(opts.dataset, opts.split, opts.data_dir)
    skipped = dict(no_mask=0, corrupt=0, empty_mask=0)
    examples = iter_examples(source, opts.masks, pipeline.resolution, skipped)
    first = next(examples, None)
    if first is None:
        raise ValueError(f"{opts.dataset}/{opts.split}: no usable example (skipped: {skipped})")
    examples = itertools.islice(itertools.chain([first], examples), opts.num)
    sampler = ShardedSampler(pipeline)

    for folder in ("images", "inputs", "masks"):  # an earlier run's images are replaced
        os.makedirs(os.path.join(opts.out, folder), exist_ok=True)
        stale = [f for f in os.listdir(os.path.join(opts.out, folder)) if _NUMBERED.fullmatch(f)]
        for name in stale:
            os.remove(os.path.join(opts.out, folder, name))
        if stale:
            report(f"evaluate: removed {len(stale)} images of an earlier run from {folder}/")
    # Each batch is written as it comes; the metrics read the images back a batch at a time,
    # so memory stays one batch whatever --num is.
    rows = []
    for chunk, images in generate(sampler, examples, opts, report):
        for example, image in zip(chunk, images):
            number = len(rows)
            names = {"image": f"images/{number:05d}.png", "input": f"inputs/{number:05d}.png",
                     "mask": f"masks/{number:05d}.png"}  # fmt: skip
            for key, array in (("image", image), ("input", example.image), ("mask", example.mask)):
                Image.fromarray(array).save(os.path.join(opts.out, names[key]))
            rows.append(dict(number=number, record=example.index, example_id=example.example_id,
                             prompt=example.prompt, seed=opts.seed + number, **names))  # fmt: skip
    if len(rows) < opts.num:
        report(f"evaluate: only {len(rows)} usable examples in {opts.dataset}/{opts.split}")
    files = {k: [os.path.join(opts.out, r[k]) for r in rows] for k in ("image", "input", "mask")}
    generated, originals = ImageFiles(files["image"]), ImageFiles(files["input"])
    masks = ImageFiles(files["mask"], mode="L")
    prompts = [r["prompt"] for r in rows]
    feature_dims = {}  # the Frechet distances computed, and their feature sizes
    if inception is not None:
        feature_dims["FID"] = FEATURE_DIM
    if clip is not None:
        feature_dims["CLIP-FD"] = clip.model.projections.visual_projection.out_features
    notes = sample_size_warnings(len(rows), feature_dims)
    for note in notes:
        report(f"evaluate: warning: {note}")
    with warnings.catch_warnings():  # distances' SmallSampleWarning: said above, by metric
        warnings.simplefilter("ignore", SmallSampleWarning)
        summary, per_example = compute_metrics(generated, originals, masks, prompts,
                                               inception=inception, clip=clip)  # fmt: skip
    for name, values in per_example.items():
        for row, value in zip(rows, values):
            row[name] = _finite_or_none(float(value))
    s = pipeline.sampling
    result = {
        "metrics": {k: _finite_or_none(v) for k, v in summary.items()},
        "warnings": notes,
        "settings": dict(
            weights=opts.weights,
            dataset=opts.dataset,
            split=opts.split,
            num=len(rows),
            masks=opts.masks,
            seed=opts.seed,
            resolution=pipeline.resolution,
            num_steps=s.num_steps if opts.num_steps is None else opts.num_steps,
            guidance_scale=s.guidance_scale if opts.guidance_scale is None else opts.guidance_scale,
            eta=s.eta,
            batch_size=sampler.batch_size(opts.batch_size),
            paste_back=opts.paste_back,
            devices=len(sampler.devices),
            dtype=opts.dtype,
            clip=opts.clip,
            inception=opts.inception,
            skipped=skipped,
        ),
        "examples": rows,
    }
    with open(os.path.join(opts.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_index_html(os.path.join(opts.out, "index.html"), rows, result["metrics"])
    sheet = contact_sheet(originals, masks, generated, prompts, opts.sheet_rows)
    sheet.save(os.path.join(opts.out, "contact_sheet.png"))
    report(f"evaluate: wrote {opts.out} ({len(rows)} examples): {result['metrics']}")
    return result


def main(argv: Sequence[str]) -> int:
    from catflax.images import ImageReadError
    from catflax.weights.io import WeightFileError

    if {"-h", "--help", "--helpshort"} & set(argv):
        print(__doc__ + "\nflags:\n" + _flag_values().get_help())
        return 0
    try:
        run(parse(argv))
    except (flags.Error, FileNotFoundError, KeyError, ImageReadError, WeightFileError,
            ValueError) as e:  # fmt: skip
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
