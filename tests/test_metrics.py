"""Frechet distance, CMMD and preservation metrics against direct computations."""

import warnings

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from catflax.metrics import distances, preservation


def _correlated(rng, n, d, shift=0.0):
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + shift


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = _correlated(rng, 300, 12), _correlated(rng, 200, 12, shift=0.3)
    sa, sb = distances.feature_statistics(a), distances.feature_statistics(b)
    np.testing.assert_allclose(sa.sigma, np.cov(a.T), rtol=1e-12)
    got = distances.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    # The symmetric form tr sqrt(S1^1/2 S2 S1^1/2), equal to tr sqrt(S1 S2), computed directly.
    root1 = scipy.linalg.sqrtm(sa.sigma).real
    cross = scipy.linalg.sqrtm(root1 @ sb.sigma @ root1).real
    mu_diff = a.mean(0) - b.mean(0)
    ref = mu_diff @ mu_diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * np.trace(cross)
    assert got > 0.5
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert distances.frechet_distance_of(sa, sb) == got
    np.testing.assert_allclose(distances.frechet_distance_of(sa, sb, "eigh"), ref, rtol=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    got = distances.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    ref = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    full_rank = distances.feature_statistics(_correlated(rng, 500, 32))
    assert abs(distances.frechet_distance_of(full_rank, full_rank)) < 1e-8
    assert abs(distances.frechet_distance_of(full_rank, full_rank, "eigh")) < 1e-8
    # Fewer samples than dimensions (singular covariance, as with < 2048 images for FID).
    singular = distances.feature_statistics(rng.uniform(0, 1, (20, 64)))
    for method in ("sqrtm", "eigh"):
        fd = distances.frechet_distance_of(singular, singular, method)
        assert abs(fd) < 1e-5 * np.trace(singular.sigma)


def test_low_rank_frechet_distance_from_features_is_exact():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 1, (12, 40)), rng.uniform(0, 1, (9, 40)) ** 2
    # N < D: the nuclear-norm route, and a warning that the value depends on N
    with pytest.warns(distances.SmallSampleWarning, match="12 and 9 samples of 40-d"):
        low_rank = distances.frechet_distance_from_features(a, b)
    sa, sb = distances.feature_statistics(a), distances.feature_statistics(b)
    for method in ("sqrtm", "eigh"):
        np.testing.assert_allclose(
            low_rank, distances.frechet_distance_of(sa, sb, method), rtol=1e-6
        )
    with pytest.warns(distances.SmallSampleWarning):
        assert abs(distances.frechet_distance_from_features(a, a)) < 1e-10
    many = rng.standard_normal((60, 8))  # N > D: the full route, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", distances.SmallSampleWarning)
        np.testing.assert_allclose(
            distances.frechet_distance_from_features(many, many[::-1] + 1.0),
            distances.frechet_distance_from_features(many, many[::-1] + 1.0, "lowrank"),
            rtol=1e-8,
        )
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\), got \(60, 8\) and \(9, 40\)"):
        distances.frechet_distance_from_features(many, b)
    with pytest.raises(ValueError, match="got 'svd'"):
        distances.frechet_distance_from_features(many, many, "svd")


def test_frechet_distance_rejects_mismatched_statistics(tmp_path):
    stats = distances.feature_statistics(np.random.default_rng(2).standard_normal((10, 4)))
    with pytest.raises(ValueError, match="mismatched statistics"):
        distances.frechet_distance(stats.mu, stats.sigma, stats.mu[:3], stats.sigma[:3, :3])
    with pytest.raises(ValueError, match=r"N>=2"):
        distances.feature_statistics(np.zeros((1, 4)))
    stats.save(str(tmp_path / "s.npz"))
    loaded = distances.FeatureStats.load(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 10
    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(ValueError, match=r"bad\.npz: expected arrays 'mu' and 'sigma'"):
        distances.FeatureStats.load(str(tmp_path / "bad.npz"))


def _cmmd_direct(x, y, sigma=10.0, scale=1000.0):
    """The CMMD formula written out: every pair, Gaussian RBF, biased MMD^2 estimator."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * sigma**2))

    return scale * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_cmmd_matches_direct_numpy_formula():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((70, 24)) + 0.5
    y = rng.standard_normal((45, 24))
    ref = _cmmd_direct(x, y)
    assert ref > 1e-3
    np.testing.assert_allclose(distances.cmmd(x, y, block=16), ref, rtol=1e-9)
    np.testing.assert_allclose(distances.cmmd(x, y), ref, rtol=1e-9)
    np.testing.assert_allclose(distances.cmmd(3.0 * x, y), ref, rtol=1e-9)  # normalised inside
    np.testing.assert_allclose(
        distances.cmmd(x, y, sigma=0.5, scale=1.0), _cmmd_direct(x, y, 0.5, 1.0), rtol=1e-9
    )
    assert abs(distances.cmmd(x, x)) < 1e-9
    with pytest.raises(ValueError, match="embeddings"):
        distances.cmmd(x, y[:, :5])


def test_preservation_metrics_are_exact_on_constructed_images():
    rng = np.random.default_rng(4)
    originals = rng.integers(20, 200, (3, 6, 5, 3), dtype=np.uint8)
    masks = np.zeros((3, 6, 5), np.uint8)
    masks[:, 1:3, 1:4] = 255  # 6 pixels inside, 24 outside
    masks[0, 5, 4] = 127  # 127 is outside
    masks[1, 0, 0] = 128  # 128 is inside: 23 outside pixels
    masks[2] = 200  # everything inside: no outside region
    outputs = originals.copy()
    outputs[:, 1:3, 1:4] = 0  # changes inside the mask do not count
    outputs[0] += 10  # every outside value of image 0 off by 10
    outputs[0, 1:3, 1:4] = 0
    outputs[1, 0, 0] = 0  # image 1: only a masked pixel differs

    mse, psnr = preservation.outside_mask_errors(outputs, originals, masks)
    assert mse[0] == (10 / 255) ** 2
    np.testing.assert_allclose(psnr[0], 20 * np.log10(255 / 10), rtol=1e-12)
    assert mse[1] == 0 and psnr[1] == preservation.MAX_PSNR_DB
    assert np.isnan(mse[2]) and np.isnan(psnr[2])

    outputs[1, 5, 0, 2] = originals[1, 5, 0, 2] + 23  # one value of 23 * 3 outside values
    mse, psnr = preservation.outside_mask_errors(outputs, originals, masks[..., None])
    assert mse[1] == pytest.approx((23 / 255) ** 2 / (23 * 3), rel=1e-12)
    summary = preservation.preservation_metrics(outputs, originals, masks)
    assert summary["count"] == 2
    assert summary["mse_outside"] == pytest.approx((mse[0] + mse[1]) / 2, rel=1e-12)
    assert summary["psnr_outside"] == pytest.approx((psnr[0] + psnr[1]) / 2, rel=1e-12)


def test_preservation_rejects_bad_inputs():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="outputs must be uint8"):
        preservation.outside_mask_errors(images.astype(np.float32), images, images[..., 0])
    with pytest.raises(ValueError, match=r"masks \(2, 3, 4\) must be"):
        preservation.outside_mask_errors(images, images, images[:, :3, :, 0])
