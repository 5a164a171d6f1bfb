"""Sample grids during training: masked input | mask | sample, for TensorBoard and a PNG."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image


def sample_grid(model, config, num_images: int = 4, seed: int = 0) -> np.ndarray | None:
    """DDIM samples for the first eval examples, as one (rows*R, 3*R, 3) uint8 grid."""
    from catflax.data.feed import Feed
    from catflax.pipeline import CATPipeline

    if jax.process_count() > 1:  # the pipeline samples host-locally; grids are single-host
        logging.info("sample grid skipped: %d processes", jax.process_count())
        return None
    feed = Feed.from_config(config, "eval")
    batch = {k: np.asarray(v)[:num_images] for k, v in feed.next_local().items()}
    pipe = CATPipeline.from_model(model, resolution=config.data.resolution,
                                  sampling=dict(config.sampling))  # fmt: skip
    samples = pipe.sample(batch, [seed + i for i in range(len(batch["input_ids"]))])
    R = samples.shape[1]
    masked = np.clip((batch["masked512"] + 1) * 127.5, 0, 255).astype(np.uint8)
    mask = batch["mask64"][..., 0] > 0.5
    mask = np.repeat(np.repeat(mask, R // mask.shape[1], 1), R // mask.shape[2], 2)
    mask = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, -1)
    rows = [np.concatenate([m, k, s], axis=1) for m, k, s in zip(masked, mask, samples)]
    return np.concatenate(rows, axis=0)


def write_sample_grid(graphdef, params, frozen, config, writer, step: int, path: str) -> None:
    """Samples with the current parameters; to TensorBoard and `path` (process 0)."""
    model = nnx.merge(graphdef, params, frozen)
    grid = sample_grid(model, config)
    if grid is None or jax.process_index() != 0:
        return
    writer.image(step, "samples", grid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
