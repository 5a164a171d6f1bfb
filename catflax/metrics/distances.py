"""Distances between feature sets: Frechet distance (FID, CLIP-FD) and CMMD, in float64 numpy."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import scipy.linalg

# CMMD (Jayasumana et al., CVPR 2024; google-research/cmmd/distance.py): Gaussian RBF kernel of
# bandwidth 10 on L2-normalised CLIP image embeddings, the result scaled by 1000.
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


class SmallSampleWarning(UserWarning):
    """A Frechet distance from no more samples than feature dimensions: singular covariances."""


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D,D) of N feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def save(self, path: str) -> None:
        """pytorch-fid's .npz layout (`mu`, `sigma`), plus `count`."""
        np.savez(path, mu=self.mu, sigma=self.sigma, count=self.count)

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: feature statistics file not found")
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {f.files}")
            count = int(f["count"]) if "count" in f else -1
            return cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), count)


def feature_statistics(features_ND: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance (np.cov, N-1) of features (N, D), as pytorch-fid computes."""
    x = np.asarray(features_ND, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape (N>=2, D), got {x.shape}")
    return FeatureStats(np.mean(x, axis=0), np.cov(x, rowvar=False), len(x))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), the Frechet distance of two
    Gaussians. `sqrtm` as in pytorch-fid: if the matrix square root is not finite (singular
    product), `eps` is added to both diagonals; an imaginary part above 1e-3 is an error.
    `eigh` uses tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (two symmetric eigensolves,
    about twice as fast at 2048 dimensions, equal to rounding)."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        return float(
            diff @ diff
            + np.trace(sigma1)
            + np.trace(sigma2)
            - 2.0 * _trace_sqrt_eigh(sigma1, sigma2)
        )
    if method != "sqrtm":
        raise ValueError(f"frechet_distance method must be 'sqrtm' or 'eigh', got {method!r}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 sigma2) has an imaginary part of {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2, via the symmetric S1^1/2 S2 S1^1/2."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    m = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.maximum(eigenvalues, 0.0)).sum())


def frechet_distance_of(a: FeatureStats, b: FeatureStats, method: str = "sqrtm") -> float:
    """Frechet distance between two sets' statistics (FID when they are Inception pool3)."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)


def frechet_distance_from_features(
    a_ND: np.ndarray, b_MD: np.ndarray, method: str = "auto"
) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N, D) and (M, D).

    With fewer samples than dimensions (`auto`, or `lowrank`), the covariances have rank < D
    and tr sqrt(S_a S_b) is exactly the nuclear norm of A B^T / sqrt((N-1)(M-1)) for the
    centred features A, B: milliseconds instead of a D x D sqrtm. Otherwise as `method`.
    Warns (SmallSampleWarning) when a set has no more samples than D: the value is then biased
    upwards by an amount that depends on N, so only values at equal N compare."""
    if method not in ("auto", "lowrank", "sqrtm", "eigh"):
        raise ValueError(f"method must be 'auto', 'lowrank', 'sqrtm' or 'eigh', got {method!r}")
    a, b = np.asarray(a_ND, np.float64), np.asarray(b_MD, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need features (N, D) and (M, D), got {a.shape} and {b.shape}")
    dim = a.shape[-1]
    sa, sb = feature_statistics(a), feature_statistics(b)
    if min(len(a), len(b)) <= dim:
        warnings.warn(
            f"Frechet distance from {len(a)} and {len(b)} samples of {dim}-d features: "
            f"singular covariances (rank < {dim}); the value is biased upwards at small N, so "
            "compare only values at equal N",
            SmallSampleWarning,
            stacklevel=2,
        )
    if method == "auto":
        method = "lowrank" if max(len(a), len(b)) <= dim else "sqrtm"
    if method != "lowrank":
        return frechet_distance_of(sa, sb, method)
    cross = (a - sa.mu) @ (b - sb.mu).T / np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    diff = sa.mu - sb.mu
    return float(diff @ diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2.0 * trace_sqrt)


def l2_normalize(x_ND: np.ndarray) -> np.ndarray:
    x = np.asarray(x_ND, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _mean_rbf_kernel(x: np.ndarray, y: np.ndarray, gamma: float, block: int) -> float:
    """mean_ij exp(-gamma ||x_i - y_j||^2), in row blocks so no N x N matrix is ever held."""
    x_sq, y_sq = np.sum(x * x, axis=1), np.sum(y * y, axis=1)
    total = 0.0
    for start in range(0, len(x), block):
        xb = x[start : start + block]
        sq_dist = x_sq[start : start + block, None] + y_sq[None, :] - 2.0 * (xb @ y.T)
        total += float(np.exp(-gamma * sq_dist).sum())
    return total / (len(x) * len(y))


def cmmd(
    x_ND: np.ndarray,
    y_ND: np.ndarray,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    block: int = 2048,
) -> float:
    """CMMD: scale * MMD^2 with k(a,b) = exp(-||a-b||^2 / (2 sigma^2)) between the L2-normalised
    CLIP image embeddings of two sets (the biased estimator: all pairs, diagonals included)."""
    x, y = l2_normalize(x_ND), l2_normalize(y_ND)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need embeddings (N, D) and (M, D), got {x.shape} and {y.shape}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = _mean_rbf_kernel(x, x, gamma, block)
    k_yy = _mean_rbf_kernel(y, y, gamma, block)
    k_xy = _mean_rbf_kernel(x, y, gamma, block)
    return scale * (k_xx + k_yy - 2.0 * k_xy)
