"""Sample grids during training: masked input | mask | sample, for TensorBoard and a PNG."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from catflax.sharding import batch_shards


def sample_grid(model, config, num_images: int = 4, seed: int = 0, mesh=None) -> np.ndarray | None:
    """DDIM samples for the first eval examples, as one (rows*R, 3*R, 3) uint8 grid.

    On several processes (`mesh`: the trainer's, which the model's parameters live on) each
    process samples its first eval examples as its share of one global batch; the grid shows
    the first `num_images` of all of them, in process order, on every process."""
    from catflax.data.feed import Feed
    from catflax.pipeline import CATPipeline

    processes = jax.process_count()
    per_process = num_images
    if processes > 1:  # equal shares, each a multiple of the process's batch-axis devices
        shards = batch_shards(mesh) // processes
        per_process = shards * math.ceil(math.ceil(num_images / processes) / shards)
    feed = Feed.from_config(config, "eval")
    batch = {k: np.asarray(v)[:per_process] for k, v in feed.next_local().items()}
    count = len(batch["input_ids"])
    if processes > 1 and count < per_process:  # (every process has the same count)
        logging.warning("sample grid skipped: %d eval examples per process, %d needed",
                        count, per_process)  # fmt: skip
        return None
    pipe = CATPipeline.from_model(model, resolution=config.data.resolution,
                                  sampling=dict(config.sampling))  # fmt: skip
    first = jax.process_index() * count
    seeds = [seed + first + i for i in range(count)]
    samples = pipe.sample(batch, seeds, mesh=mesh if processes > 1 else None)
    masked, mask = batch["masked512"], batch["mask64"]
    if processes > 1:  # every process's examples, as the samples
        masked, mask = (multihost_utils.process_allgather(x, tiled=True) for x in (masked, mask))
    samples, masked, mask = samples[:num_images], masked[:num_images], mask[:num_images]
    R = samples.shape[1]
    masked = np.clip((masked + 1) * 127.5, 0, 255).astype(np.uint8)
    mask = mask[..., 0] > 0.5
    mask = np.repeat(np.repeat(mask, R // mask.shape[1], 1), R // mask.shape[2], 2)
    mask = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, -1)
    rows = [np.concatenate([m, k, s], axis=1) for m, k, s in zip(masked, mask, samples)]
    return np.concatenate(rows, axis=0)


def write_sample_grid(
    graphdef, params, frozen, config, writer, step: int, path: str | os.PathLike, mesh=None
) -> None:
    """Samples with the current parameters; to TensorBoard and `path` (process 0). Every
    process calls it (on several, they sample together over `mesh`)."""
    model = nnx.merge(graphdef, params, frozen)
    grid = sample_grid(model, config, mesh=mesh)
    if grid is None or jax.process_index() != 0:
        return
    writer.image(step, "samples", grid)
    save_png(path, grid)


def save_png(path: str | os.PathLike, image_HWC: np.ndarray) -> None:
    """Writes a uint8 image as PNG to a local path or a URL (gs://), making its folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(image_HWC).save(f, format="PNG")
