"""Reading the pipeline's images and masks (PIL, numpy or paths) and pasting results back."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage


class InpaintWarning(UserWarning):
    """Input the pipeline fixed up (a resized mask) or had nothing to do for (an empty mask)."""


class ImageReadError(ValueError):
    """An image or mask that cannot be read; the message names it."""


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        image = Image.open(path)
        image.load()  # decode now: truncated or corrupt files fail here, not later
        # as displayed: a phone JPEG's EXIF rotation applied (the mask was drawn on that view)
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, EOFError) as e:  # fmt: skip
        raise ImageReadError(f"{path}: not a readable {what} ({e})") from e
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageReadError(f"{name}: expected an (H,W), (H,W,3) or (H,W,4) array, got {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1):
            raise ImageReadError(f"{name}: float arrays must lie in [0, 1] (or pass uint8)")
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageReadError(f"{name}: array dtype {a.dtype}; expected uint8, bool or float")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer greyscale (PNG modes I;16*, mode I) as 8-bit L: 16-bit values (any above 255)
    scaled by 1/257, where PIL's own conversion clips them to 255; 0..255 values kept."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image, np.float64)
    if values.max(initial=0) > 255:
        values = np.round(values / 257)
    return Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")


def load_image(image, name: str = "image") -> tuple[Image.Image, str]:
    """(RGB PIL image, its name): from a PIL image, an array or a path (any mode, converted)."""
    if isinstance(image, str | os.PathLike):
        name = os.fspath(image)
        image = _open(image, "image")
    elif isinstance(image, np.ndarray):
        image = _from_array(image, name)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL image, numpy array or path, got {type(image)}")
    image = _to_8bit(image)
    return (image if image.mode == "RGB" else image.convert("RGB")), name


def load_mask(mask, size_WH: tuple[int, int], name: str = "mask", image_name: str = "image"):
    """(L (0..255) PIL mask of `size_WH`, its name); white = repaint. A mask of another size
    is resized (nearest) with a warning."""
    if isinstance(mask, str | os.PathLike):
        name = os.fspath(mask)
        mask = _open(mask, "mask")
    elif isinstance(mask, np.ndarray):
        mask = _from_array(mask, name)
    elif not isinstance(mask, Image.Image):
        raise TypeError(f"{name}: expected a PIL image, numpy array or path, got {type(mask)}")
    mask = _to_8bit(mask)
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = np.asarray(mask.convert("RGBA"))
        colour, alpha = rgba[..., :3], rgba[..., 3]
        if alpha.min() != alpha.max() and (colour == colour.reshape(-1, 3)[0]).all():
            raise ImageReadError(
                f"{name}: the mask is one colour and marks its area by transparency; catflax "
                "reads masks as grey levels (white = repaint), so pass the alpha channel (or "
                "its inverse, if transparent means repaint) as a greyscale mask"
            )
    mask = mask if mask.mode == "L" else mask.convert("L")
    if mask.size != tuple(size_WH):
        warnings.warn(
            f"{name}: mask is {mask.size[0]}x{mask.size[1]} but {image_name} is "
            f"{size_WH[0]}x{size_WH[1]}; resizing the mask to the image",
            InpaintWarning,
            stacklevel=3,
        )
        mask = mask.resize(tuple(size_WH), Image.Resampling.NEAREST)
    return mask, name


def blend_weights(mask_HW: np.ndarray, feather: float = 0.0) -> np.ndarray:
    """Per-pixel weight of the generated image, float32 in [0,1]: mask/255, its edge blurred
    (Gaussian, sigma feather/2, cut at `feather` pixels) when feather > 0."""
    m = np.asarray(mask_HW, np.float32) / 255.0
    if feather > 0:
        m = ndimage.gaussian_filter(m, sigma=feather / 2, radius=math.ceil(feather), mode="nearest")
    return np.clip(m, 0.0, 1.0)


def paste_back(
    original_HW3: np.ndarray, generated_HW3: np.ndarray, mask_HW: np.ndarray, feather: float = 0.0
) -> np.ndarray:
    """generated where the mask is, original elsewhere (blended by `blend_weights`); pixels
    of weight 0 are the original's exactly. uint8 (H,W,3)."""
    w = blend_weights(mask_HW, feather)[..., None]
    orig, gen = original_HW3.astype(np.float32), generated_HW3.astype(np.float32)
    out = np.clip(np.round(orig + (gen - orig) * w), 0, 255).astype(np.uint8)
    return np.where(w > 0, out, original_HW3)
