"""Image preprocessing for the CLIP teacher (SPEC.md §1), in numpy or inside a jitted step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(images_BHWC):
    """uint8 (or 0..255 float) RGB images -> float32 CLIP input: (x/255 - mean) / std.

    Works on numpy arrays and, traced, on jax arrays (so the step can normalise on device).
    """
    xp = jnp if isinstance(images_BHWC, jax.Array) else np
    x = xp.asarray(images_BHWC).astype(xp.float32) / 255.0
    return (x - xp.asarray(CLIP_MEAN, xp.float32)) / xp.asarray(CLIP_STD, xp.float32)


def resize_center_crop(image: Image.Image, size: int = 224) -> np.ndarray:
    """CLIPImageProcessor's geometry: bicubic resize of the short side to `size` (the long side
    to int(size * long / short), truncated as transformers does), centre crop."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
