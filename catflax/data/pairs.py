"""Text-image pairs (LAION-style subsets) -> records with an empty mask.

Expected under the source folder: `{split}.jsonl` (split one of train, validation, test), one JSON
object per line with the image path (key `image`, or `image_path` / `image_name` / `file_name`;
relative paths are relative to the folder) and its text (key `text`, or `caption`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from catflax.data import records

SPLITS = ("train", "validation", "test")
IMAGE_KEYS = ("image", "image_path", "image_name", "file_name")
TEXT_KEYS = ("text", "caption")


def jsonl_path(source_dir: str, split: str) -> str:
    return os.path.join(source_dir, f"{split}.jsonl")


def available_splits(source_dir: str) -> list[str]:
    splits = [s for s in SPLITS if os.path.isfile(jsonl_path(source_dir, s))]
    if not splits:
        expected = ", ".join(jsonl_path(source_dir, s) for s in SPLITS)
        raise FileNotFoundError(f"no pairs file found; expected one of: {expected}")
    return splits


def _first(item: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in item:
            return item[key]
    raise KeyError(f"none of the keys {keys}")


def generate(
    source_dir: str, split: str, report: records.SplitReport
) -> Iterator[tuple[str, dict]]:
    """(line number, record) for every usable line; skips are counted in `report` (bad lines,
    undecodable ones included, also logged as file:line)."""
    path = jsonl_path(source_dir, split)
    with open(path, "rb") as f:  # decoded line by line: one bad byte costs one line
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                item = json.loads(line)
                image_path = str(_first(item, IMAGE_KEYS))
                text = str(_first(item, TEXT_KEYS)).strip()
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                records.skip_line(report, "bad_line", path, line_number, e)
                continue
            where = f"{os.path.basename(path)}:{line_number}"
            if not text:
                report.skip("empty_text", where)
                continue
            full_path = os.path.join(source_dir, image_path)  # absolute paths stay absolute
            if not os.path.isfile(full_path):
                report.skip("missing_image", image_path)
                continue
            with open(full_path, "rb") as image_file:
                image_bytes = image_file.read()
            try:
                records.check_image(image_bytes)
            except records.DecodeError:
                report.skip("corrupt_image", image_path)
                continue
            yield (
                f"{line_number:010d}",
                records.make_record(
                    image=image_bytes, label=text, example_id=f"pairs/{split}/{image_path}"
                ),
            )
