"""The examples an evaluation scores: a prepared split's object records in order, resized to
the model resolution, with the mask the model is given (`--masks=seg`: the object mask resized
soft, SPEC.md §4; `--masks=box`: the record's box drawn at the model resolution, as the
reference's box evaluation) and the binary mask for paste-back and metrics."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np
from PIL import Image

from catflax.data import geometry, records

MASK_KINDS = ("box", "seg")


@dataclasses.dataclass
class Example:
    index: int  # record index in the split
    example_id: str
    prompt: str
    image: np.ndarray  # (R,R,3) uint8, at the model resolution
    mask: np.ndarray  # (R,R) uint8 0/255, binary, at the model resolution (paste-back, metrics)
    model_mask: np.ndarray  # (R,R) uint8 what the model is given: SPEC.md §4's soft resize


def filled_box(mask_HW: np.ndarray) -> np.ndarray:
    """The filled bounding box (0/255) of the mask's pixels >= 128."""
    out = np.zeros(np.shape(mask_HW), np.uint8)
    found = geometry.extent(mask_HW)
    if found is not None:
        top, bottom, left, right = found
        out[top : bottom + 1, left : right + 1] = 255
    return out


def _box_at(box, mask_HW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The object's box as a filled 0/255 mask of `size`: the record's stored box (ymin, xmin,
    ymax, xmax in [0, 1]; the annotated one, often looser than the mask), else the mask's
    extent."""
    if box is not None and box[2] > box[0] and box[3] > box[1]:
        return geometry.box_mask(size[::-1], np.asarray(box, np.float32), inclusive=True)
    return filled_box(np.asarray(Image.fromarray(filled_box(mask_HW)).resize(size)))


def iter_examples(source, masks: str, resolution: int, skipped: dict) -> Iterator[Example]:
    """The object examples of a record source in order, resized to `resolution`; records
    skipped are counted by reason in `skipped` (no_mask, corrupt, empty_mask)."""
    if masks not in MASK_KINDS:
        raise ValueError(f"--masks={masks!r}: choose one of {list(MASK_KINDS)}")
    for index in range(len(source)):
        record = source[index]
        if not len(record["mask"]):
            skipped["no_mask"] += 1
            continue
        try:
            image = records.decode_image(record["image"])
            mask = records.decode_mask(record["mask"])
        except records.DecodeError:
            skipped["corrupt"] += 1
            continue
        size = (resolution, resolution)  # PIL's default resample, as SPEC.md §4 evaluation
        if masks == "box":  # drawn at the model resolution, as the reference's box evaluation
            model_mask = binary = _box_at(record.get("box"), mask, size)
        else:  # soft (resized, not thresholded), as SPEC.md §4
            model_mask = np.asarray(Image.fromarray(mask).resize(size))
            binary = np.where(geometry.binary(model_mask), 255, 0).astype(np.uint8)
        if not binary.any():
            skipped["empty_mask"] += 1
            continue
        yield Example(index, records.text(record["example_id"]), records.text(record["label"]),
                      np.asarray(image.resize(size)), binary, model_mask)  # fmt: skip


def read_examples(source, num: int, masks: str, resolution: int) -> tuple[list[Example], dict]:
    """The first `num` usable object examples of a record source (iter_examples), and the
    counts of records skipped by reason before the last of them."""
    skipped = dict(no_mask=0, corrupt=0, empty_mask=0)
    return list(itertools.islice(iter_examples(source, masks, resolution, skipped), num)), skipped
