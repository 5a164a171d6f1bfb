"""The record every builder writes, image/mask codecs, and the per-split build report.

Records hold encoded bytes only (no numpy image arrays), so TFDS writes and reads them as
ArrayRecord without TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
from absl import logging
from PIL import Image

# The empty `mask` marks an example without an object (text-image pairs): its mask is all zeros.
NO_MASK = b""
NO_BOX = np.zeros((4,), np.float32)
REPORT_FILE = "prepare_report.json"


class DecodeError(ValueError):
    """An image or mask that cannot be decoded (corrupt, truncated, wrong format)."""


def features():
    """The TFDS features of every catflax dataset (bytes, text and a small float vector)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(
                shape=(), dtype=np.object_, doc="encoded JPEG or PNG bytes, as in the source"
            ),
            "mask": tfds.features.Tensor(
                shape=(), dtype=np.object_, doc="PNG, 8-bit gray 0/255, image size; b'' = none"
            ),
            "box": tfds.features.Tensor(
                shape=(4,), dtype=np.float32, doc="object box (ymin, xmin, ymax, xmax) in [0,1]"
            ),
            "label": tfds.features.Text(doc="the object's class name, or the pair's text"),
            "caption": tfds.features.Text(doc="a long caption of the object, or ''"),
            "example_id": tfds.features.Text(doc="where the example came from"),
        }
    )


def make_record(
    image: bytes,
    label: str,
    example_id: str,
    mask: bytes = NO_MASK,
    box: np.ndarray | None = None,
    caption: str = "",
) -> dict:
    """One record in the layout of `features()`."""
    box = NO_BOX if box is None else np.asarray(box, np.float32).reshape(4)
    return {
        "image": image,
        "mask": mask,
        "box": box,
        "label": label,
        "caption": caption,
        "example_id": example_id,
    }


def text(value: str | bytes) -> str:
    """TFDS reads Text features back as bytes; in-memory records hold str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> fully decoded RGB PIL image; DecodeError if corrupt or truncated."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # raises on truncated data (PIL does not pad truncated JPEGs by default)
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise DecodeError(f"cannot decode image ({len(data)} bytes): {e}") from e


def check_image(data: bytes) -> tuple[int, int]:
    """Decodes cheaply (JPEG DCT scaling) to find corrupt or truncated files; returns (w, h)."""
    try:
        image = Image.open(io.BytesIO(data))
        size = image.size
        if image.format == "JPEG":
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        return size
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise DecodeError(f"cannot decode image ({len(data)} bytes): {e}") from e


def decode_mask(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG (or any image) bytes -> (H, W) uint8 mask; nearest-resized to `size` (w, h) if given."""
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
        if mask.mode != "L":
            mask = mask.convert("L")
        if size is not None and mask.size != tuple(size):
            mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
        return np.asarray(mask, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise DecodeError(f"cannot decode mask ({len(data)} bytes): {e}") from e


def encode_png(array_HW: np.ndarray) -> bytes:
    """(H, W) uint8 (or bool) mask -> PNG bytes (gray, 0..255)."""
    array = np.asarray(array_HW)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def box_from_mask(mask_HW: np.ndarray) -> np.ndarray:
    """Normalised (ymin, xmin, ymax, xmax) of the nonzero pixels; zeros for an empty mask."""
    rows, cols = np.nonzero(mask_HW)
    if rows.size == 0:
        return NO_BOX.copy()
    h, w = mask_HW.shape
    return np.array(
        [rows.min() / h, cols.min() / w, (rows.max() + 1) / h, (cols.max() + 1) / w], np.float32
    )


def read_long_captions(
    source_dir: str, split: str, report: SplitReport | None = None
) -> dict[str, str]:
    """Optional long captions for a split: `long_captions_{split}.jsonl` ({"key", "caption"}
    per line) and/or a folder `long_captions/{split}/{key}.txt` (the reference's layout).
    Bad lines (not UTF-8, not JSON, no key or caption) and undecodable .txt files are skipped,
    logged with file:line and counted in `report` as a bad_long_caption warning (their examples
    are still written, without a long caption)."""
    captions: dict[str, str] = {}
    path = os.path.join(source_dir, f"long_captions_{split}.jsonl")
    if os.path.isfile(path):
        with open(path, "rb") as f:  # decoded line by line: one bad byte costs one line
            for line_number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    captions[str(item["key"])] = str(item["caption"]).strip()
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                    skip_line(report, "bad_long_caption", path, line_number, e, warning=True)
    folder = os.path.join(source_dir, "long_captions", split)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".txt"):
                file = os.path.join(folder, name)
                try:
                    with open(file, encoding="utf-8") as f:
                        captions[name[: -len(".txt")]] = f.read().strip()
                except UnicodeDecodeError as e:
                    logging.warning("%s: bad_long_caption skipped: %s", file, e)
                    if report is not None:
                        report.warn("bad_long_caption", f"{name} ({e})")
    return captions


def skip_line(
    report: SplitReport | None, reason: str, path: str, line_number: int, detail: object,
    warning: bool = False,
) -> None:  # fmt: skip
    """A bad line of a source file: logged as path:line and counted in `report` (if given) with
    file:line (detail) as its sample, as a skipped example or, with `warning`, as a warning (a
    line that cost no example)."""
    logging.warning("%s:%d: %s skipped: %s", path, line_number, reason, detail)
    if report is not None:
        count = report.warn if warning else report.skip
        count(reason, f"{os.path.basename(path)}:{line_number} ({detail})")


@dataclasses.dataclass
class SplitReport:
    """What a builder did with one split's source: examples written, skipped and why, and
    warnings: bad inputs that cost no example (a bad long-caption line)."""

    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # A few offending items per reason (file names, annotation ids), for the user to look at.
    samples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, item: str, max_samples: int = 5) -> None:
        """An example not written, and why."""
        self.skipped[reason] += 1
        self._sample(reason, item, max_samples)

    def warn(self, reason: str, item: str, max_samples: int = 5) -> None:
        """A bad input that cost no example (its example is written without it)."""
        self.warnings[reason] += 1
        self._sample(reason, item, max_samples)

    def _sample(self, reason: str, item: str, max_samples: int) -> None:
        examples = self.samples.setdefault(reason, [])
        if len(examples) < max_samples and item not in examples:
            examples.append(item)

    def as_dict(self) -> dict:
        return {
            "written": self.written,
            "skipped": dict(self.skipped),
            "warnings": dict(self.warnings),
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, report: Mapping) -> SplitReport:
        """The inverse of as_dict (reports saved before warnings were counted have none)."""
        return cls(
            written=report["written"],
            skipped=collections.Counter(report.get("skipped", {})),
            warnings=collections.Counter(report.get("warnings", {})),
            samples=dict(report.get("samples", {})),
        )


def format_report(reports: Mapping[str, SplitReport]) -> str:
    """Human-readable lines: per split, written and skipped counts by reason with samples, then
    warnings (bad inputs that cost no example) the same way."""
    lines = []
    for split, report in reports.items():
        header = f"{split}: written {report.written}, skipped {sum(report.skipped.values())}"
        if report.warnings:
            header += f", warnings {sum(report.warnings.values())}"
        lines.append(header)
        for kind, counts in (("", report.skipped), ("warning: ", report.warnings)):
            for reason, count in sorted(counts.items()):
                samples = ", ".join(report.samples.get(reason, []))
                lines.append(
                    f"  {kind}{reason}: {count}" + (f" (e.g. {samples})" if samples else "")
                )
    return "\n".join(lines)


def count_written(records: Iterable, report: SplitReport):
    """Passes records through, counting them as written."""
    for key, record in records:
        report.written += 1
        yield key, record
