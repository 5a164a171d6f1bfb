"""OpenImages V6 segmentations -> inpainting records: one per segmentation mask.

Expected under the source folder (the files OpenImages distributes; masks unzipped):
    {split}-annotations-object-segmentation.csv   MaskPath,ImageID,LabelName,BoxID,BoxXMin,...
    oidv6-class-descriptions.csv                   LabelName,DisplayName (or the headerless
                                                   class-descriptions-boxable.csv)
    {split}-masks/**/<MaskPath>                    (or {split}/labels/masks/**, fiftyone's layout)
    {split}/<ImageID>.jpg                          (or {split}/data/<ImageID>.jpg)
    long_captions_{split}.jsonl                    optional, key "<ImageID>_<BoxID>"
with split one of train, validation, test.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator

import numpy as np

from catflax.data import records

SPLITS = ("train", "validation", "test")
CLASS_FILES = ("oidv6-class-descriptions.csv", "class-descriptions-boxable.csv")
REQUIRED_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxID")
BOX_COLUMNS = ("BoxYMin", "BoxXMin", "BoxYMax", "BoxXMax")


def csv_path(source_dir: str, split: str) -> str:
    return os.path.join(source_dir, f"{split}-annotations-object-segmentation.csv")


def available_splits(source_dir: str) -> list[str]:
    splits = [s for s in SPLITS if os.path.isfile(csv_path(source_dir, s))]
    if not splits:
        expected = ", ".join(csv_path(source_dir, s) for s in SPLITS)
        raise FileNotFoundError(
            f"no OpenImages segmentation CSV found; expected one of: {expected}"
        )
    return splits


def read_class_names(source_dir: str) -> dict[str, str]:
    """LabelName (/m/...) -> DisplayName, from the first class-description file found."""
    for name in CLASS_FILES:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", newline="") as f:
                    rows = [row for row in csv.reader(f) if row]
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8: {e}") from e
            if rows and rows[0][:2] == ["LabelName", "DisplayName"]:
                rows = rows[1:]
            bad = [i for i, row in enumerate(rows) if len(row) < 2]
            if bad:
                raise ValueError(f"{path}: row {bad[0] + 1} has fewer than 2 columns")
            return {row[0]: row[1] for row in rows}
    raise FileNotFoundError(f"no class descriptions in {source_dir}; expected one of {CLASS_FILES}")


def index_files(folders: list[str], suffix: str) -> dict[str, str]:
    """File name -> path of every `suffix` file under the folders that exist (recursive)."""
    index = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                if name.endswith(suffix):
                    index.setdefault(name, os.path.join(root, name))
    return index


def find_image(source_dir: str, split: str, image_id: str) -> str | None:
    for path in (
        os.path.join(source_dir, split, f"{image_id}.jpg"),
        os.path.join(source_dir, split, "data", f"{image_id}.jpg"),
    ):
        if os.path.isfile(path):
            return path
    return None


def read_rows(path: str, report: records.SplitReport | None = None) -> dict[str, list[dict]]:
    """CSV rows grouped by ImageID, in order of first appearance. Rows with too few fields or
    bytes that are not UTF-8 are skipped, logged as file:line and counted in `report` as
    bad_row."""
    by_image: dict[str, list[dict]] = {}
    # Undecodable bytes become lone surrogates, found per row below: one bad byte costs one row.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS + BOX_COLUMNS if c not in fields]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        for row in reader:
            values = [v for k, v in row.items() if k is not None and v is not None]
            if len(values) < len(fields):  # DictReader fills the missing fields with None
                detail = f"{len(values)} of {len(fields)} fields"
                records.skip_line(report, "bad_row", path, reader.line_num, detail)
                continue
            try:
                "".join(values).encode("utf-8")
            except UnicodeEncodeError:
                records.skip_line(report, "bad_row", path, reader.line_num, "not UTF-8")
                continue
            by_image.setdefault(row["ImageID"], []).append(row)
    return by_image


def load_mask(path: str) -> np.ndarray:
    """Mask PNG (0/1 or 0/255) -> (H, W) uint8 0/255 at its own resolution, which is often not
    its image's: the reference augments it there and resizes image and mask from their own
    sizes (`geometry.prepare_example`)."""
    with open(path, "rb") as f:
        mask = records.decode_mask(f.read())
    if mask.max() == 1:
        mask = mask * 255
    return np.where(mask >= 128, 255, 0).astype(np.uint8)


def generate(
    source_dir: str,
    split: str,
    report: records.SplitReport,
    min_area_fraction: float = 0.0,
) -> Iterator[tuple[str, dict]]:
    """(mask name, record) for every usable segmentation; skips are counted in `report`."""
    class_names = read_class_names(source_dir)
    rows_by_image = read_rows(csv_path(source_dir, split), report)
    masks = index_files(
        [os.path.join(source_dir, f"{split}-masks"), os.path.join(source_dir, split, "labels")],
        ".png",
    )
    captions = records.read_long_captions(source_dir, split, report)
    for image_id, rows in rows_by_image.items():
        image_path = find_image(source_dir, split, image_id)
        if image_path is None:
            for _ in rows:
                report.skip("missing_image", f"{image_id}.jpg")
            continue
        with open(image_path, "rb") as f:
            image_bytes = f.read()
        try:
            records.check_image(image_bytes)
        except records.DecodeError:
            for _ in rows:
                report.skip("corrupt_image", os.path.basename(image_path))
            continue
        for row in rows:
            mask_name = os.path.basename(row["MaskPath"])
            if row["LabelName"] not in class_names:
                report.skip("unknown_label", f"{mask_name} ({row['LabelName']})")
                continue
            if mask_name not in masks:
                report.skip("missing_mask", mask_name)
                continue
            try:
                mask = load_mask(masks[mask_name])
            except records.DecodeError:
                report.skip("unreadable_mask", mask_name)
                continue
            area = int((mask > 0).sum())
            if area == 0:
                report.skip("empty_mask", mask_name)
                continue
            if area < min_area_fraction * mask.size:
                report.skip("too_small", mask_name)
                continue
            try:
                box = np.array([float(row[c]) for c in BOX_COLUMNS], np.float32)
            except (ValueError, TypeError):
                box = records.box_from_mask(mask)
            yield (
                mask_name.removesuffix(".png"),
                records.make_record(
                    image=image_bytes,
                    label=class_names[row["LabelName"]],
                    example_id=f"openimages/{split}/{mask_name}",
                    mask=records.encode_png(mask),
                    box=np.clip(box, 0.0, 1.0),
                    caption=captions.get(f"{image_id}_{row['BoxID']}", ""),
                ),
            )
