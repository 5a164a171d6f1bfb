r"""Inpaint images from the command line: image + mask (white = repaint) + prompt -> image.

    python -m catflax.inpaint --weights=PIPELINE_DIR --image=in.jpg --mask=mask.png \
        --prompt="a red ball" --out=out.png
    python -m catflax.inpaint --weights=cat.safetensors --clip=clip-vit-large-patch14 ...
    python -m catflax.inpaint --weights=PIPELINE_DIR --batch=jobs.jsonl --out_dir=results/

`--weights` is a catflax export directory or an official CAT-Diffusion checkpoint file (then
`--clip` names a transformers CLIP directory for the tokenizer). Any input size works: the model
sees the image resized to its resolution, and the result is resized back. `--batch` reads one
JSON object per line, {"image": ..., "mask": ..., "prompt": ..., "out": optional}; relative
image and mask paths are relative to the JSONL file, `out` to `--out_dir`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence

from absl import app, flags
from PIL import Image


@dataclasses.dataclass
class Job:
    image: str
    mask: str
    prompt: str
    out: str
    seed: int


@dataclasses.dataclass
class Options:
    weights: str
    image: str | None = None
    mask: str | None = None
    prompt: str | None = None
    out: str | None = None
    batch: str | None = None
    out_dir: str | None = None
    clip: str | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    seed: int = 0
    paste_back: bool = True
    feather: float = 0.0
    batch_size: int = 1
    dtype: str = "float32"
    resolution: int | None = None
    allow_pickle: bool = False

    @classmethod
    def from_flags(cls, fv: flags.FlagValues) -> Options:
        return cls(**{f.name: fv[f.name].value for f in dataclasses.fields(cls)})


def _define_dtype(name, default, help_, **kwargs):
    return flags.DEFINE_enum(name, default, ["float32", "bfloat16"], help_, **kwargs)


_FLAGS = (  # (define, name, default, help)
    (flags.DEFINE_string, "weights", None, "catflax export directory or CAT checkpoint file"),
    (flags.DEFINE_string, "clip", None, "transformers CLIP directory (tokenizer, missing towers)"),
    (flags.DEFINE_string, "image", None, "input image (any size; non-RGB is converted)"),
    (flags.DEFINE_string, "mask", None, "mask image: white = repaint"),
    (flags.DEFINE_string, "prompt", None, "what to paint in the mask"),
    (flags.DEFINE_string, "out", None, "output image path (.png keeps pixels exact)"),
    (flags.DEFINE_string, "batch", None, "JSONL of {image, mask, prompt, out?} lines"),
    (flags.DEFINE_string, "out_dir", None, "output directory for --batch"),
    (flags.DEFINE_integer, "num_steps", None, "DDIM steps (default: the pipeline's, 50)"),
    (
        flags.DEFINE_float,
        "guidance_scale",
        None,
        "classifier-free guidance (default: the pipeline's, 7.5)",
    ),
    (flags.DEFINE_float, "eta", None, "DDIM eta (default: the pipeline's, 0 = deterministic)"),
    (flags.DEFINE_integer, "seed", 0, "noise seed (--batch: line i uses seed + i)"),
    (flags.DEFINE_bool, "paste_back", True, "keep pixels outside the mask exactly the input's"),
    (flags.DEFINE_float, "feather", 0.0, "blur the paste-back edge over this many pixels"),
    (flags.DEFINE_integer, "batch_size", 1, "examples per model call in --batch mode"),
    (_define_dtype, "dtype", "float32", "compute dtype"),
    (flags.DEFINE_integer, "resolution", None, "model image side (default: the pipeline's)"),
    (flags.DEFINE_bool, "allow_pickle", False, "allow a pickled .ckpt checkpoint (runs code)"),
)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags (on `fv`; a private FlagValues keeps tests apart from other CLIs)."""
    for define, name, default, help_ in _FLAGS:
        define(name, default, help_, flag_values=fv)


def parse(argv: Sequence[str]) -> Options:
    """Options from command-line arguments (without the program name)."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["inpaint", *argv])
    return Options.from_flags(fv)


def jobs_from_options(opts: Options) -> list[Job]:
    """The work to do; every input file is checked to exist first (errors name the file)."""
    if opts.weights is None:
        raise ValueError("--weights is required (a catflax export directory or checkpoint file)")
    if opts.batch:
        if opts.image or opts.mask or opts.out or opts.prompt:
            raise ValueError(
                "--batch replaces --image/--mask/--prompt/--out (the JSONL lines give them); "
                "use --out_dir for outputs"
            )
        if not opts.out_dir:
            raise ValueError("--batch needs --out_dir")
        jobs = read_jobs(opts.batch, opts.out_dir, opts.seed)
    else:
        missing = [f"--{n}" for n in ("image", "mask", "prompt", "out") if getattr(opts, n) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or give --batch=FILE.jsonl)")
        jobs = [Job(opts.image, opts.mask, opts.prompt, opts.out, opts.seed)]
    check_numbers(opts, len(jobs))
    inputs = {os.path.realpath(p): p for job in jobs for p in (job.image, job.mask)}
    for job in jobs:
        if (same := inputs.get(os.path.realpath(job.out))) is not None:
            hint = "; give --out_dir another folder" if opts.batch else ""
            raise ValueError(f"{job.out}: the output would overwrite the input {same}{hint}")
    for job in jobs:
        for what, path in (("image", job.image), ("mask", job.mask)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: {what} file not found")
        if not _writes_rgb(os.path.splitext(job.out)[1].lower()):
            raise ValueError(f"{job.out}: output needs an image file extension (.png, .jpg, ...)")
        if os.path.isdir(job.out):
            raise ValueError(f"{job.out}: output path is a directory")
    return jobs


def check_numbers(opts: Options, num_jobs: int) -> None:
    """The numeric options, before any model loads (errors name the flag and value)."""
    problems = []
    if opts.feather < 0 or not math.isfinite(opts.feather):
        problems.append(f"--feather={opts.feather}: must be >= 0 (pixels)")
    if opts.num_steps is not None and opts.num_steps < 1:
        problems.append(f"--num_steps={opts.num_steps}: must be >= 1")
    if opts.guidance_scale is not None and not math.isfinite(opts.guidance_scale):
        problems.append(f"--guidance_scale={opts.guidance_scale}: must be a finite number")
    if opts.eta is not None and not (math.isfinite(opts.eta) and opts.eta >= 0):
        problems.append(f"--eta={opts.eta}: must be >= 0")
    if not 0 <= opts.seed or opts.seed + num_jobs > 2**32:
        problems.append(f"--seed={opts.seed}: seeds (one per job) must lie in [0, 2**32)")
    if opts.batch_size < 1:
        problems.append(f"--batch_size={opts.batch_size}: must be >= 1")
    if opts.resolution is not None and (opts.resolution < 8 or opts.resolution % 8):
        problems.append(f"--resolution={opts.resolution}: must be a positive multiple of 8")
    if problems:
        raise ValueError("; ".join(problems))


@functools.cache
def _writes_rgb(extension: str) -> bool:
    """Whether PIL saves an RGB image under this file extension (tried on a 1x1 image)."""
    fmt = Image.registered_extensions().get(extension)
    if fmt not in Image.SAVE:
        return False
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # PIL's writers raise many kinds
        return False
    return True


def read_jobs(path: str, out_dir: str, seed: int) -> list[Job]:
    """Lines of {image, mask, prompt, out?}; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: batch file not found")
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    entries = []
    for n, line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        if not isinstance(entry, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(entry).__name__}")
        missing = [k for k in ("image", "mask", "prompt") if not isinstance(entry.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: needs string field(s) {missing}")
        entries.append((n, entry))
    explicit: dict[str, int] = {}  # an "out" a line asks for is kept as it is, and only once
    for n, entry in entries:
        if out := entry.get("out"):
            if (same := os.path.normpath(out)) in explicit:
                raise ValueError(f'{path}:{n}: "out": {out!r} is line {explicit[same]}\'s too')
            explicit[same] = n
    jobs, names = [], set(explicit)
    for i, (n, entry) in enumerate(entries):
        image, mask = (os.path.join(base, entry[k]) for k in ("image", "mask"))
        out = entry.get("out")
        if not out:  # the image's name as .png; two lines on one image keep both results
            stem = os.path.splitext(os.path.basename(image))[0]
            candidates = (f"{stem}_{n}{f'_{k}' if k else ''}.png" for k in itertools.count())
            out = f"{stem}.png"
            while out in names:  # never a name another line asked for
                out = next(candidates)
            names.add(out)
        jobs.append(Job(image, mask, entry["prompt"], os.path.join(out_dir, out), seed + i))
    if not jobs:
        raise ValueError(f"{path}: no jobs in the batch file")
    return jobs


def run(opts: Options, pipeline=None, report=print) -> list[str]:
    """Does the jobs (with `pipeline`, else the one `opts.weights` names); returns the outputs.

    Messages (resized masks, empty masks, files written) go to `report`.
    """
    jobs = jobs_from_options(opts)
    if pipeline is None:
        from catflax.pipeline import CATPipeline

        pipeline = CATPipeline.from_pretrained(
            opts.weights, clip_path=opts.clip, dtype=opts.dtype, resolution=opts.resolution,
            allow_pickle=opts.allow_pickle,
        )  # fmt: skip
    size = max(1, opts.batch_size) if opts.batch else 1
    written = []
    for start in range(0, len(jobs), size):
        chunk = jobs[start : start + size]
        padded = chunk + [chunk[0]] * (size - len(chunk))  # one compiled batch size for all
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = pipeline(
                [j.image for j in padded], [j.mask for j in padded], [j.prompt for j in padded],
                num_steps=opts.num_steps, guidance_scale=opts.guidance_scale,
                seed=[j.seed for j in padded], paste_back=opts.paste_back, feather=opts.feather,
                eta=opts.eta,
            )  # fmt: skip
        for message in dict.fromkeys(str(w.message) for w in caught):
            report(f"warning: {message}")
        for job, image in zip(chunk, images):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(job.out)), exist_ok=True)
                image.save(job.out)
            except OSError as e:
                raise OSError(f"{job.out}: cannot write the output ({e})") from e
            report(f"wrote {job.out} ({image.size[0]}x{image.size[1]})")
            written.append(job.out)
    return written


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    from catflax.images import ImageReadError
    from catflax.weights.io import WeightFileError

    try:
        run(Options.from_flags(flags.FLAGS))
    except (OSError, ImageReadError, WeightFileError, ValueError) as e:
        sys.exit(f"inpaint: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
