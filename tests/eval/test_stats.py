import numpy as np
import pytest
import torch

from cascade.eval.stats import FeatureStats, check_protocols, frechet_distance


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, 2 * dim))
    return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


def _features(seed: int = 0, n: int = 1000, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) * rng.uniform(0.1, 10.0, size=dim)
    return 50.0 + rng.standard_normal((n, dim)) @ mix  # correlated, far from the origin


def _partials(x: np.ndarray, seed: int) -> list[FeatureStats]:
    """Three partial statistics built from random-sized chunks (sizes 1 upward) dealt out at random."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=40, replace=False))
    parts = [FeatureStats() for _ in range(3)]
    for chunk in np.split(x, cuts):
        parts[rng.integers(3)].update(chunk)
    assert all(p.count > 0 for p in parts)
    return parts


def test_streaming_matches_numpy():
    x = _features()
    mean_ref, cov_ref = x.mean(axis=0), np.cov(x, rowvar=False, ddof=1)

    single = FeatureStats(x.shape[1])
    for chunk in np.array_split(x, 37):
        single.update(chunk)
    assert single.count == len(x)
    assert _rel(single.mean, mean_ref) < 1e-10
    assert _rel(single.covariance, cov_ref) < 1e-10

    groupings = [
        lambda a, b, c: a.merge(b).merge(c),  # (a + b) + c
        lambda a, b, c: a.merge(c.merge(b)),  # a + (c + b)
        lambda a, b, c: c.merge(a).merge(b),  # (c + a) + b
    ]
    for seed, group in enumerate(groupings):
        merged = group(*_partials(x, seed=seed))
        assert merged.count == len(x)
        assert _rel(merged.mean, mean_ref) < 1e-10
        assert _rel(merged.covariance, cov_ref) < 1e-10


def test_update_accepts_float32_tensors_and_empty_batches():
    x = torch.randn(200, 8) * 3 + 1
    stats = FeatureStats().update(x[:0]).update(x[:120]).update(x[120:])
    ref = x.double().numpy()
    assert _rel(stats.mean, ref.mean(axis=0)) < 1e-12
    assert _rel(stats.covariance, np.cov(ref, rowvar=False)) < 1e-12
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.zeros((3, 9)))


def test_frechet_identical_is_zero():
    sigma = _random_spd(np.random.default_rng(7), 64)  # unit-scale covariance
    mu = np.random.default_rng(8).standard_normal(64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # large-scale features (variances up to ~1e4): zero relative to the trace
    x = _features(dim=64)
    mu, sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma) / 64
    # rank-deficient covariance (fewer features than dimensions) stays finite and zero
    y = _features(n=10, dim=32)
    mu, sigma = y.mean(axis=0), np.cov(y, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.01, 5.0, 32), rng.uniform(0.01, 5.0, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0, 2.5])
def test_frechet_scaled_covariance(c):
    s1 = _random_spd(np.random.default_rng(2), 48)
    mu = np.ones(48)
    expected = (1 - c) ** 2 * np.trace(s1)
    assert frechet_distance(mu, s1, mu, c**2 * s1) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_shifted_means_and_symmetry():
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 40), _random_spd(rng, 40)
    mu1, d = rng.standard_normal(40), rng.standard_normal(40)
    assert frechet_distance(mu1, s1, mu1 + d, s1) == pytest.approx(d @ d, rel=1e-9)
    forward = frechet_distance(mu1, s1, mu1 + d, s2)
    assert forward == pytest.approx(frechet_distance(mu1 + d, s2, mu1, s1), rel=1e-10)
    assert frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu1 + d), torch.tensor(s2)) == forward


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The usual reference formula (pytorch-fid): tr of the real part of sqrtm(S1 S2)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = np.real(scipy_linalg.sqrtm(s1 @ s2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [64, 400])
def test_frechet_agrees_with_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-8)


def test_save_load_round_trip(tmp_path):
    x = _features(seed=4)
    stats = FeatureStats().update(x[:600])
    protocol = {"detector": "i3d", "weights_sha256": "ab12", "num_frames": 16, "resize": [224, 224], "num_videos": 600}
    path = tmp_path / "reference"  # no suffix: saved exactly where asked
    stats.save(path, protocol)
    loaded, loaded_protocol = FeatureStats.load(path)
    assert loaded_protocol == protocol
    assert loaded.count == stats.count
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.covariance, stats.covariance)
    # loaded statistics can still be extended
    loaded.update(x[600:])
    assert _rel(loaded.covariance, np.cov(x, rowvar=False)) < 1e-10


def test_check_protocols_names_differing_keys():
    a = {"weights_sha256": "ab12", "num_frames": 16, "resize": (224, 224), "num_videos": 2048}
    check_protocols(a, {**a, "resize": [224, 224]})  # tuple vs list after JSON: the same protocol
    with pytest.raises(ValueError, match="num_frames") as err:
        check_protocols(a, {**a, "num_frames": 32, "fps": 8})
    assert "fps" in str(err.value) and "weights_sha256" not in str(err.value)
