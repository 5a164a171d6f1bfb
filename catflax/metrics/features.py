"""Running a frozen feature network over many images: fixed-size batches, sharded over devices."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from catflax.metrics.image_sets import as_sequence, check_float_range, shapes_of
from catflax.metrics.inception import InceptionV3, resize_bilinear


@functools.lru_cache(maxsize=32)
def _jitted(graphdef, apply):
    """One compiled function per (model structure, apply function), reused across calls."""
    return jax.jit(lambda state, x: apply(nnx.merge(graphdef, state), x))


def map_batches(
    model: nnx.Module,
    apply: Callable[[nnx.Module, jax.Array], jax.Array],
    inputs: np.ndarray | Sequence,
    batch_size: int,
    prepare: Callable[[Sequence], np.ndarray] = np.asarray,
) -> np.ndarray:
    """`apply(model, batch)` over the leading axis of `inputs`, in batches of `batch_size` (the
    last one padded, so one compilation serves all), data-parallel over this process's devices
    (the batch rounded up to a multiple of their number) unless the batch is smaller than that
    number; returns the concatenated numpy result. `prepare` turns each slice of `inputs` into
    the batch array on the host (so a large set is converted one batch at a time). Pass a
    module-level `apply` so that its compilation is reused across calls."""
    n = len(inputs)
    if n == 0:
        raise ValueError("map_batches: no inputs")
    batch_size = max(1, min(batch_size, n))
    devices = jax.local_devices()
    mesh = None
    if len(devices) > 1 and batch_size >= len(devices):  # a smaller batch runs on one device
        batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = Mesh(np.asarray(devices), ("data",))
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    run = _jitted(graphdef, apply)
    outputs = []
    for start in range(0, n, batch_size):
        batch = prepare(inputs[start : start + batch_size])
        real = len(batch)
        if real < batch_size:
            pad = np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        x = jax.device_put(batch, data_sharding) if mesh is not None else jnp.asarray(batch)
        outputs.append(np.asarray(jax.device_get(run(state, x)))[:real])
    return np.concatenate(outputs)


def _pool3(model: InceptionV3, images_BHWC: jax.Array) -> jax.Array:
    return model(images_BHWC)


def _as_unit_float(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    check_float_range("images", images, 0.0, 1.0, " (pass uint8 images, or divide by 255)")
    return images.astype(np.float32)


def inception_features(
    model: InceptionV3, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 50
) -> np.ndarray:
    """Pool3 features (N, 2048) float64 of RGB images as pytorch-fid computes them: uint8 ->
    /255 (float images must be in [0, 1]), bilinear resize to 299, network. `images` is one
    (N,H,W,3) array or a list of (H,W,3) arrays whose sizes may differ (each is then resized on
    the host first, which is the same linear map the network applies to a batch); a sequence is
    read one batch at a time (`catflax.metrics.image_sets.ImageFiles` keeps a set on disk)."""
    size = model.config.resize_to
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N,H,W,3) RGB, got shape {images.shape}")
        prepare = _as_unit_float
    else:
        images = as_sequence(images)
        shapes = shapes_of(images)
        bad = [s for s in shapes if len(s) != 3 or s[-1] != 3]
        if bad:
            raise ValueError(f"images must be (H,W,3) RGB arrays, got shapes {sorted(bad)}")
        if len(shapes) == 1:
            prepare = lambda ims: _as_unit_float(np.stack(ims))  # noqa: E731
        elif size is None:
            raise ValueError(
                f"images of different sizes {sorted(shapes)[:4]} need resize_to set on the model"
            )
        else:
            prepare = lambda ims: np.concatenate(  # noqa: E731
                [resize_bilinear(_as_unit_float(im)[None], size) for im in ims]
            )
    # Converted to float one batch at a time: a set of 5,000 512 px images is 3.9 GB as uint8.
    return map_batches(model, _pool3, images, batch_size, prepare).astype(np.float64)
