"""COCO 2017 instances -> inpainting records: one per non-crowd instance above a minimum area.

Expected under the source folder (the files COCO distributes, unzipped):
    annotations/instances_train2017.json, annotations/instances_val2017.json
    train2017/*.jpg, val2017/*.jpg
    long_captions_{train,validation}.jsonl   optional, {"key": "<annotation id>", "caption": ...}
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator

import numpy as np

from catflax.data import records

SPLIT_DIRS = {"train": "train2017", "validation": "val2017"}


def annotation_path(source_dir: str, split: str) -> str:
    return os.path.join(source_dir, "annotations", f"instances_{SPLIT_DIRS[split]}.json")


def available_splits(source_dir: str) -> list[str]:
    """Splits whose instances file exists; FileNotFoundError naming what is missing if none."""
    splits = [s for s in SPLIT_DIRS if os.path.isfile(annotation_path(source_dir, s))]
    if not splits:
        expected = ", ".join(annotation_path(source_dir, s) for s in SPLIT_DIRS)
        raise FileNotFoundError(f"no COCO instances file found; expected one of: {expected}")
    return splits


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygons, uncompressed RLE or compressed RLE -> (H, W) uint8 0/1 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(f"RLE size {segmentation.get('size')} != image {[height, width]}")
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    return np.asarray(mask_utils.decode(rle), np.uint8)


def _box(bbox, height: int, width: int) -> np.ndarray:
    """COCO [x, y, w, h] pixels -> normalised (ymin, xmin, ymax, xmax)."""
    x, y, w, h = (float(v) for v in bbox)
    box = np.array([y / height, x / width, (y + h) / height, (x + w) / width], np.float32)
    return np.clip(box, 0.0, 1.0)


def generate(
    source_dir: str,
    split: str,
    report: records.SplitReport,
    min_area_fraction: float = 0.01,
) -> Iterator[tuple[str, dict]]:
    """(annotation id, record) for every usable instance; skips are counted in `report`."""
    path = annotation_path(source_dir, split)
    with open(path, encoding="utf-8") as f:
        try:
            coco = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{path}: missing top-level key {key!r}")
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    instances = collections.defaultdict(list)
    for ann in coco["annotations"]:
        instances[ann["image_id"]].append(ann)
    captions = records.read_long_captions(source_dir, split, report)
    image_dir = os.path.join(source_dir, SPLIT_DIRS[split])

    for image_info in sorted(coco["images"], key=lambda i: i["id"]):
        anns = sorted(instances.get(image_info["id"], []), key=lambda a: a["id"])
        if not anns:
            continue
        file_name = image_info["file_name"]
        height, width = int(image_info["height"]), int(image_info["width"])
        image_path = os.path.join(image_dir, file_name)
        if not os.path.isfile(image_path):
            for _ in anns:
                report.skip("missing_image", file_name)
            continue
        with open(image_path, "rb") as f:
            image_bytes = f.read()
        try:
            size = records.check_image(image_bytes)
        except records.DecodeError:
            for _ in anns:
                report.skip("corrupt_image", file_name)
            continue
        if size != (width, height):
            for _ in anns:
                report.skip("size_mismatch", f"{file_name} is {size}, json says {width, height}")
            continue
        for ann in anns:
            ann_id = str(ann["id"])
            if ann.get("iscrowd", 0):
                report.skip("crowd", ann_id)
                continue
            if ann.get("category_id") not in categories:
                report.skip("unknown_category", f"{ann_id} (category {ann.get('category_id')})")
                continue
            try:
                mask = decode_segmentation(ann.get("segmentation"), height, width)
            except (ValueError, TypeError, KeyError) as e:
                report.skip("bad_segmentation", f"{ann_id}: {e}")
                continue
            area = int(mask.sum())
            if area == 0:
                report.skip("empty_mask", ann_id)
                continue
            if area < min_area_fraction * height * width:
                report.skip("too_small", ann_id)
                continue
            bbox = ann.get("bbox")
            box = _box(bbox, height, width) if bbox else records.box_from_mask(mask)
            yield (
                ann_id,
                records.make_record(
                    image=image_bytes,
                    label=categories[ann["category_id"]],
                    example_id=f"coco/{SPLIT_DIRS[split]}/{file_name}#{ann_id}",
                    mask=records.encode_png(mask.astype(np.uint8) * 255),
                    box=box,
                    caption=captions.get(ann_id, ""),
                ),
            )
