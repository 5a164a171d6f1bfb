"""SPEC.md §4 for one example, in numpy and PIL: mask augmentation, resize, crop, the model inputs.

Geometry follows the reference code: the short-side resize is torchvision's `Resize(size)` on PIL
images (bilinear, long side truncated), every other resize is PIL's default (bicubic); masks are
soft 0..255 after resizing and a pixel counts as masked where round(mask/255) is 1 (mask >= 128).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage

DILATE_KERNEL = 5  # the reference dilates once with a 5x5 kernel
MASKED_GRAY = 127  # value of fully masked pixels in the CLIP input


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Output sizes: VAE image `resolution`, CLIP image `clip_resolution`, patch grid."""

    resolution: int = 512  # image512 / masked512 side
    clip_resolution: int = 224  # image224 / masked224 side
    patch_grid: int = 16  # mask16 side: CLIP patches per side (224 / 14)

    def __post_init__(self):
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution}: must be a multiple of 8 (VAE f=8)")
        if self.clip_resolution % self.patch_grid:
            raise ValueError(
                f"clip_resolution={self.clip_resolution} is not a multiple of "
                f"patch_grid={self.patch_grid}"
            )

    @property
    def latent(self) -> int:
        return self.resolution // 8


def binary(mask_HW: np.ndarray) -> np.ndarray:
    """Masked pixels of a soft 0..255 mask: round(m/255) == 1, i.e. m >= 128."""
    return np.asarray(mask_HW) >= 128


def extent(mask_HW: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), inclusive, of the masked pixels; None if none are."""
    rows = np.flatnonzero(binary(mask_HW).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(binary(mask_HW).any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def dilate(mask_HW: np.ndarray, kernel: int = DILATE_KERNEL) -> np.ndarray:
    """Grey dilation with a kernel x kernel square (cv2.dilate, one iteration)."""
    return ndimage.maximum_filter(np.asarray(mask_HW, np.uint8), size=kernel, mode="nearest")


def box_mask(shape_HW: tuple[int, int], box: np.ndarray, inclusive: bool = False) -> np.ndarray:
    """Filled box (ymin, xmin, ymax, xmax in [0,1]) as a 0/255 mask, truncating like the ref:
    the training augmentation's slice ends before int(ymax * h) (numpy); the evaluation's box
    (`inclusive`, the reference's filled cv2.rectangle) includes that row and column."""
    h, w = shape_HW
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    end = int(inclusive)
    mask = np.zeros((h, w), np.uint8)
    mask[int(ymin * h) : int(ymax * h) + end, int(xmin * w) : int(xmax * w) + end] = 255
    return mask


def augment_mask(
    mask_HW: np.ndarray, box: np.ndarray, rng: np.random.Generator, dilate_prob: float = 0.5
) -> np.ndarray:
    """Training mask augmentation: dilate with p=dilate_prob, else the object's filled box.

    The box is the stored one (as the reference); where none was stored, the mask's extent.
    """
    if rng.random() < dilate_prob:
        return dilate(mask_HW)
    box = np.asarray(box, np.float32)
    if not (box[2] > box[0] and box[3] > box[1]):
        found = extent(np.where(mask_HW > 0, 255, 0))
        if found is None:
            return mask_HW
        top, bottom, left, right = found
        h, w = mask_HW.shape
        box = np.array([top / h, left / w, (bottom + 1) / h, (right + 1) / w], np.float32)
    return box_mask(mask_HW.shape, box)


def short_side_size(size_WH: tuple[int, int], short: int) -> tuple[int, int]:
    """torchvision Resize(short) output size (w, h): long side = int(short * long / short_in)."""
    w, h = size_WH
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def resize_short_side(
    image: Image.Image, mask: Image.Image, short: int
) -> tuple[Image.Image, Image.Image]:
    """Image and mask each resized (bilinear) so its short side is `short`, as the reference; a
    mask stored at another resolution (OpenImages) then sets the size, the image following it
    with PIL's default resample (the reference's `image.resize(mask.size)`)."""
    image = image.resize(short_side_size(image.size, short), Image.Resampling.BILINEAR)
    mask = mask.resize(short_side_size(mask.size, short), Image.Resampling.BILINEAR)
    if image.size != mask.size:
        image = image.resize(mask.size)
    return image, mask


def crop_offset(
    length: int, span: tuple[int, int] | None, size: int, rng: np.random.Generator | None
) -> int:
    """Start of a `size` window on an axis of `length` that contains `span` (first, last) when
    it fits; random among the valid starts, or centred when rng is None. An object larger than
    the window: the random window starts at its first row/column (the reference's crop_512),
    the centred one lies inside it around its middle."""
    last_start = length - size
    if last_start < 0:
        raise ValueError(f"cannot crop {size} from {length}")
    if span is None:
        lo, hi = 0, last_start
        centre = last_start // 2
    else:
        first, last = span
        lo, hi = max(0, last - size + 1), min(first, last_start)
        if lo > hi:  # the object is larger than the window
            if rng is not None:
                return min(first, last_start)
            lo, hi = hi, lo
        lo, hi = max(0, lo), min(hi, last_start)
        centre = (first + last) // 2 - size // 2
    if rng is None:
        return int(np.clip(centre, lo, hi))
    return int(rng.integers(lo, hi + 1))


def crop_around_mask(
    image: Image.Image, mask: Image.Image, size: int, rng: np.random.Generator | None
) -> tuple[Image.Image, Image.Image]:
    """size x size crop containing the mask's extent where it fits (random, or centred)."""
    found = extent(np.asarray(mask))
    w, h = image.size
    top = crop_offset(h, None if found is None else found[:2], size, rng)
    left = crop_offset(w, None if found is None else found[2:], size, rng)
    box = (left, top, left + size, top + size)
    return image.crop(box), mask.crop(box)


def patch_mask(mask_CC: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) int32: a patch is 1 if any of its pixels is masked (round(m/255) == 1)."""
    c = mask_CC.shape[0]
    patch = c // grid
    pixels = binary(mask_CC).reshape(grid, patch, grid, patch)
    return pixels.any(axis=(1, 3)).astype(np.int32)


def model_inputs(image: Image.Image, mask: Image.Image, sizes: Sizes, train: bool) -> dict:
    """SPEC.md §4 outputs from a `resolution`-square crop (RGB) and its soft mask (L).

    Returns image512/masked512 (R,R,3) float32 in [-1,1], image224/masked224 (C,C,3) uint8,
    mask512 (R,R) / mask224 (C,C) uint8 soft masks, mask64 (L,L,1) float32 {0,1},
    mask16 (G,G) int32 {0,1}.
    """
    r, c = sizes.resolution, sizes.clip_resolution
    x = np.asarray(image, np.float32)
    keep = 1.0 - np.asarray(mask, np.float32)[..., None] / 255.0  # 1 - m
    scale = np.float32(1 / 127.5)
    image512 = x * scale
    image512 -= 1.0
    masked512 = x * keep  # in place from here: these two are the big arrays
    masked512 *= scale
    masked512 -= 1.0
    image224 = image.resize((c, c))  # PIL default resample (bicubic), as the reference
    mask224 = mask.resize((c, c))
    x224 = np.asarray(image224, np.float64)
    m224 = np.asarray(mask224, np.float64)[..., None] / 255.0
    mask64 = np.asarray(mask.resize((sizes.latent, sizes.latent)), np.float32) / 255.0
    mask64 = (mask64 > 0) if train else (mask64 >= 0.5)
    assert x.shape == (r, r, 3), x.shape
    return {
        "image512": image512,
        "masked512": masked512,
        "image224": np.asarray(image224, np.uint8),
        "masked224": (x224 * (1.0 - m224) + MASKED_GRAY * m224).astype(np.uint8),
        "mask512": np.asarray(mask, np.uint8),
        "mask224": np.asarray(mask224, np.uint8),
        "mask64": mask64.astype(np.float32)[..., None],
        "mask16": patch_mask(np.asarray(mask224), sizes.patch_grid),
    }


def prepare_example(
    image: Image.Image,
    mask_HW: np.ndarray,
    box: np.ndarray,
    sizes: Sizes,
    rng: np.random.Generator | None,
    *,
    augment: bool = True,
    dilate_prob: float = 0.5,
    eval_crop: bool = False,
) -> dict:
    """One example's model inputs. Training (rng given): augment the mask (if `augment`),
    short side to `resolution`, random crop containing the mask. Evaluation (rng None): resize
    to resolution x resolution (no crop), or with `eval_crop` a centred crop around the mask.

    The mask may have its own resolution (OpenImages ships masks smaller or larger than their
    images): it is augmented there, as the reference does (the 5x5 dilation is 5 mask pixels),
    and both are resized to the output size from their own sizes."""
    if mask_HW.ndim != 2:
        raise ValueError(f"mask of shape {mask_HW.shape}: expected (H, W)")
    train = rng is not None
    if train and augment:
        mask_HW = augment_mask(mask_HW, box, rng, dilate_prob)
    mask = Image.fromarray(np.ascontiguousarray(mask_HW, np.uint8))
    r = sizes.resolution
    if train or eval_crop:
        image, mask = resize_short_side(image, mask, r)
        image, mask = crop_around_mask(image, mask, r, rng)
    else:
        image, mask = image.resize((r, r)), mask.resize((r, r))
    return model_inputs(image, mask, sizes, train)
