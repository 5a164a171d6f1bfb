"""Image sets that stay on disk: the metrics read them one batch at a time.

A 5,000-image evaluation at 512 px is 3.9 GB as uint8 (and twice that with its inputs); the
metrics take any `Sequence` of (H, W[, 3]) arrays and only ever slice it a batch at a time, so
these sequences keep the memory of an evaluation bounded by one batch. Also here: the check
that refuses float images outside the range a metric expects (0..255 floats for [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

RANGE_TOLERANCE = 1e-3  # resize / rounding overshoot allowed past a documented float range


class LazyMap(Sequence):
    """`fn(i)` for each i in `indices`, computed when indexed (a slice gives a list)."""

    def __init__(self, fn: Callable[[int], np.ndarray], indices: Sequence[int]):
        self.fn, self.indices = fn, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.fn(i) for i in self.indices[index]]
        return self.fn(self.indices[index])


class ImageFiles(LazyMap):
    """Images decoded from `paths` when indexed (`mode`: PIL mode, "RGB" or "L" for masks); a
    slice gives a list of arrays."""

    def __init__(self, paths: Sequence[str], mode: str = "RGB"):
        self.paths, self.mode = list(paths), mode
        super().__init__(self._read, range(len(self.paths)))

    def _read(self, index: int) -> np.ndarray:
        with Image.open(self.paths[index]) as image:
            return np.asarray(image.convert(self.mode))

    def shapes(self) -> set[tuple[int, ...]]:
        """The set of array shapes, from the files' headers (nothing decoded)."""
        channels = () if self.mode == "L" else (len(self.mode),)
        out = set()
        for path in self.paths:
            with Image.open(path) as image:
                out.add((image.size[1], image.size[0], *channels))
        return out


def shapes_of(images: Sequence) -> set[tuple[int, ...]]:
    """The distinct array shapes of a set of images (file headers only for ImageFiles)."""
    if isinstance(images, ImageFiles):
        return images.shapes()
    return {np.shape(image) for image in images}


def as_sequence(images: Iterable) -> Sequence | np.ndarray:
    """`images` itself when it can be sliced (arrays, lists, ImageFiles), else a list of it."""
    return images if isinstance(images, Sequence | np.ndarray) else list(images)


def float_values(images) -> tuple[float, float] | None:
    """(min, max) of float `images` (numpy or concrete jax); None for integer or empty arrays and
    for jax tracers (under jit, where the values are not known)."""
    if isinstance(images, jax.core.Tracer):
        return None
    if not isinstance(images, jax.Array):
        images = np.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating) or images.size == 0:
        return None
    return float(images.min()), float(images.max())


def check_float_range(name: str, images, lo: float, hi: float, hint: str = "") -> None:
    """Refuses float `images` with values outside [lo, hi] by more than RANGE_TOLERANCE (e.g.
    0..255 floats where [0, 1] is expected); integer arrays and jax tracers pass unchecked."""
    seen = float_values(images)
    if seen is not None and (seen[0] < lo - RANGE_TOLERANCE or seen[1] > hi + RANGE_TOLERANCE):
        raise ValueError(f"{name}: {describe_floats(seen)}; expected [{lo:.4g}, {hi:.4g}]{hint}")


def describe_floats(seen: tuple[float, float]) -> str:
    """'float values in [min, max]' for error messages, to 4 decimals."""
    return f"float values in [{round(seen[0], 4)}, {round(seen[1], 4)}]"
