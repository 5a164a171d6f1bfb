"""Synthetic shapes: a coloured shape on a textured gray background; mask = the shape.

Deterministic from (seed, split, index). The demo trains on it and the tests read it; the colour
helpers let a demo check that the prompted colour is the dominant one inside the mask.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from catflax.data import records

# Saturated colours, far apart in RGB; backgrounds are low-saturation grays, so a pixel's colour
# name is unambiguous (see `colour_name_map`).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 210),
    "pink": (240, 100, 170),
}
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("noise", "stripes", "checker", "gradient")
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
MIN_SATURATION = 60  # max-min channel spread below which a pixel is gray (no colour name)
MAX_COLOUR_DISTANCE = 100.0  # RGB distance to the nearest named colour to count as that colour


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """(h, w, 3) float texture of low saturation, and its name."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    base = rng.uniform(70, 190) + rng.uniform(-10, 10, size=3)  # slightly tinted gray
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if texture == "noise":
        coarse = rng.normal(0, 18, size=(h // 8 + 2, w // 8 + 2)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        pattern = smooth + rng.normal(0, 5, size=(h, w))
    elif texture == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        pattern = 25 * np.sin(phase)
    elif texture == "checker":
        cell = int(rng.integers(4, 17))
        pattern = np.where((yy // cell + xx // cell) % 2 == 0, 20.0, -20.0)
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(angle) + yy * np.sin(angle)
        pattern = 60 * (ramp - ramp.min()) / max(1.0, float(np.ptp(ramp))) - 30
    return base + np.asarray(pattern, np.float32)[..., None], texture


def _shape_mask(rng: np.random.Generator, h: int, w: int, shape: str) -> Image.Image:
    """0/255 mask of one shape, 30-60% of the short side, fully inside the image."""
    side = rng.uniform(0.3, 0.6) * min(h, w)
    half = side / 2
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    bbox = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(bbox, fill=255)
    elif shape == "square":
        draw.rectangle(bbox, fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=255)
    else:  # star: five points, inner radius 0.4 of the outer
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, half, 0.4 * half)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=255)
    return mask


def _where(box: np.ndarray) -> str:
    """'top left', 'centre', ... from a normalised (ymin, xmin, ymax, xmax) box."""
    cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    return f"{row} {col}".strip() or "centre"


def render(
    seed: int, index: int, split: str = "train", min_size: int = 64, max_size: int = 128
) -> dict:
    """One example as arrays: image (H,W,3) uint8, mask (H,W) uint8 0/255, colour, shape,
    label ("a red circle", "an orange star"), caption (a longer description), box."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    background, texture = _background(rng, h, w)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    mask = np.asarray(_shape_mask(rng, h, w, shape), np.uint8)
    shade = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 6, size=(h, w, 1))
    image = np.where(mask[..., None] > 0, shade, background)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    box = records.box_from_mask(mask)
    size = "small" if (box[2] - box[0]) * (box[3] - box[1]) < 0.15 else "large"
    article = "an" if colour[0] in "aeiou" else "a"
    caption = f"a {size} {colour} {shape} at the {_where(box)} of a gray {texture} background"
    return {
        "image": image,
        "mask": mask,
        "colour": colour,
        "shape": shape,
        "label": f"{article} {colour} {shape}",
        "caption": caption,
        "box": box,
    }


def encode_image(image_HW3: np.ndarray, image_format: str = "png") -> bytes:
    """RGB uint8 -> PNG (lossless, exact colours) or JPEG (quality 95) bytes."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image_HW3).save(buffer, format="PNG")
    elif image_format == "jpeg":
        Image.fromarray(image_HW3).save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format={image_format!r}: expected 'png' or 'jpeg'")
    return buffer.getvalue()


def make_record(
    seed: int,
    index: int,
    split: str = "train",
    min_size: int = 64,
    max_size: int = 128,
    image_format: str = "png",
) -> dict:
    """One synthetic example in the record layout every builder writes."""
    example = render(seed, index, split, min_size, max_size)
    return records.make_record(
        image=encode_image(example["image"], image_format),
        label=example["label"],
        example_id=f"synthetic_shapes/{split}/{seed}/{index}",
        mask=records.encode_png(example["mask"]),
        box=example["box"],
        caption=example["caption"],
    )


def generate(
    seed: int, split: str, count: int, min_size: int, max_size: int, image_format: str
) -> Iterator[tuple[str, dict]]:
    """(key, record) for `count` examples of a split."""
    for index in range(count):
        yield f"{index:08d}", make_record(seed, index, split, min_size, max_size, image_format)


# ---- colour checks (for demos and evaluation) ----


def colour_name_map(image_HW3: np.ndarray) -> np.ndarray:
    """(H, W) int: index into COLOURS of each pixel's colour name, -1 for gray/unnamed pixels."""
    pixels = np.asarray(image_HW3, np.float32)
    palette = np.asarray(list(COLOURS.values()), np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    nearest = distance.argmin(-1)
    saturated = pixels.max(-1) - pixels.min(-1) >= MIN_SATURATION
    close = distance.min(-1) <= MAX_COLOUR_DISTANCE
    return np.where(saturated & close, nearest, -1)


def colour_fractions(image_HW3: np.ndarray, mask_HW: np.ndarray) -> dict[str, float]:
    """Fraction of the masked pixels (mask >= 128) that have each colour name."""
    inside = np.asarray(mask_HW) >= 128
    total = int(inside.sum())
    names = colour_name_map(image_HW3)[inside]
    return {
        name: (float((names == i).sum()) / total if total else 0.0)
        for i, name in enumerate(COLOURS)
    }


def dominant_colour(
    image_HW3: np.ndarray, mask_HW: np.ndarray, min_fraction: float = 0.3
) -> str | None:
    """The most frequent colour name inside the mask if it covers >= min_fraction, else None."""
    fractions = colour_fractions(image_HW3, mask_HW)
    name = max(fractions, key=fractions.get)
    return name if fractions[name] >= min_fraction else None


def prompt_colour(prompt: str) -> str | None:
    """The first colour word of COLOURS in a prompt ("a red circle" -> "red")."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COLOURS:
            return word
    return None
