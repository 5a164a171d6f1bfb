"""All evaluation metrics of one run in one call: what `catflax.evaluate` writes to metrics.json."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from catflax.metrics import distances, preservation
from catflax.metrics.clip_score import CLIPScorer
from catflax.metrics.features import inception_features
from catflax.metrics.image_sets import as_sequence
from catflax.metrics.inception import InceptionV3


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def compute_metrics(
    generated: Sequence[np.ndarray],
    originals: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    prompts: Sequence[str],
    *,
    reference: Sequence[np.ndarray] | None = None,
    inception: InceptionV3 | None = None,
    clip: CLIPScorer | None = None,
    batch_size: int = 50,
    fid_method: str = "auto",
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Summary metrics and per-example arrays for uint8 RGB `generated` images against their
    `originals` (same sizes), uint8 `masks` (> 127 inside) and `prompts`.

    FID (needs `inception`) and CLIP-FD / CMMD (need `clip`) compare `generated` with
    `reference` (default: the originals); CLIP scores need `clip`; preservation always runs.
    Metrics whose model is not given are left out; FID and CLIP-FD (a covariance each) are NaN
    when either set has fewer than 2 images. Images are read and converted one batch at a
    time: any Sequence works, e.g. `image_sets.ImageFiles` for sets kept on disk.
    """
    generated, originals, masks = map(as_sequence, (generated, originals, masks))
    n = len(generated)
    if not (len(originals) == len(masks) == len(prompts) == n):
        raise ValueError(
            f"need as many originals, masks and prompts as generated images ({n}): got "
            f"{len(originals)}, {len(masks)}, {len(prompts)}"
        )
    if n == 0:
        raise ValueError("compute_metrics: no generated images")
    reference = originals if reference is None else as_sequence(reference)
    chunks = []  # preservation a batch at a time: no stacked copy of the whole set
    for i in range(0, n, batch_size):
        part = slice(i, i + batch_size)
        chunks.append(preservation.outside_mask_errors(
            np.stack(generated[part]), np.stack(originals[part]), np.stack(masks[part])
        ))  # fmt: skip
    mse, psnr = (np.concatenate(parts) for parts in zip(*chunks))
    per_example: dict[str, np.ndarray] = {"mse_outside": mse, "psnr_outside": psnr}
    summary: dict[str, float] = {
        "count": n,
        "reference_count": len(reference),
        "mse_outside": _nanmean(mse),
        "psnr_outside": _nanmean(psnr),
    }
    covariances = min(n, len(reference)) >= 2  # FID / CLIP-FD fit one to each set

    def frechet(real: np.ndarray, fake: np.ndarray) -> float:
        if not covariances:
            return float("nan")
        return distances.frechet_distance_from_features(real, fake, fid_method)

    if inception is not None:
        fake = inception_features(inception, generated, batch_size)
        real = inception_features(inception, reference, batch_size)
        summary["fid"] = frechet(real, fake)
    if clip is not None:
        fake = clip.embed_images(generated)  # once, for the CLIP score, CLIP-FD and CMMD
        scores = clip.scores(prompts, generated, masks, image_embeddings=fake)
        per_example.update(scores)
        summary.update({name: _nanmean(values) for name, values in scores.items()})
        real = clip.embed_images(reference)
        summary["clip_fd"] = frechet(real, fake)
        summary["cmmd"] = distances.cmmd(real, fake)
    return summary, per_example
