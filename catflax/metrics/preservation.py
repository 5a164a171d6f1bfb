"""Preservation of the unmasked region: MSE and PSNR outside the mask, per image."""

from __future__ import annotations

import numpy as np

MASK_THRESHOLD = 127  # a mask pixel > 127 (of 0..255) is inside the region to inpaint
MAX_PSNR_DB = 100.0  # PSNR of an exactly preserved region (MSE 0), instead of +inf


def outside_mask_errors(
    outputs_BHWC: np.ndarray, originals_BHWC: np.ndarray, masks_BHW: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per image (B,): MSE over the pixels outside the mask and all channels, on the [0, 1]
    scale (uint8 / 255), and PSNR = 10 log10(1 / MSE) in dB, capped at MAX_PSNR_DB.

    Inputs are uint8; masks are (B,H,W) or (B,H,W,1) uint8 with > 127 meaning inside. An image
    whose mask covers every pixel has no outside region: NaN for both.
    """
    outputs, originals = np.asarray(outputs_BHWC), np.asarray(originals_BHWC)
    masks = np.asarray(masks_BHW)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    for name, a in (("outputs", outputs), ("originals", originals), ("masks", masks)):
        if a.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 (0..255), got {a.dtype}")
    if outputs.shape != originals.shape or outputs.ndim != 4:
        raise ValueError(
            f"outputs {outputs.shape} and originals {originals.shape} must both be (B,H,W,C)"
        )
    if masks.shape != outputs.shape[:3]:
        raise ValueError(f"masks {masks.shape} must be (B,H,W) = {outputs.shape[:3]}")
    # Exact integer sums, one image at a time (no float copies of a whole set).
    count = np.zeros(len(outputs), np.int64)
    sq_sum = np.zeros(len(outputs), np.int64)
    for i, (out, orig, mask) in enumerate(zip(outputs, originals, masks)):
        outside = mask <= MASK_THRESHOLD  # (H,W)
        diff = out[outside].astype(np.int32) - orig[outside].astype(np.int32)  # (P, C)
        count[i], sq_sum[i] = diff.size, np.einsum("pc,pc->", diff, diff, dtype=np.int64)
    sq_sum = sq_sum / 255.0**2
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = np.where(count > 0, sq_sum / np.maximum(count, 1), np.nan)
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / mse), MAX_PSNR_DB)
    psnr = np.where(np.isnan(mse), np.nan, np.minimum(psnr, MAX_PSNR_DB))
    return mse, psnr


def preservation_metrics(
    outputs_BHWC: np.ndarray, originals_BHWC: np.ndarray, masks_BHW: np.ndarray
) -> dict[str, float]:
    """Means over images (NaN ones skipped) of outside-mask MSE ([0,1] scale) and PSNR (dB)."""
    mse, psnr = outside_mask_errors(outputs_BHWC, originals_BHWC, masks_BHW)
    valid = ~np.isnan(mse)
    if not valid.any():
        return {"mse_outside": float("nan"), "psnr_outside": float("nan"), "count": 0}
    return {
        "mse_outside": float(mse[valid].mean()),
        "psnr_outside": float(psnr[valid].mean()),
        "count": int(valid.sum()),
    }
