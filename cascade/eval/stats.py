"""Feature statistics and the Fréchet distance between Gaussians fitted to them (FID / FVD).

Everything here is float64 NumPy and needs no model code: a detector turns videos into features, `FeatureStats`
accumulates them (across batches and across processes), and `frechet_distance` compares two fitted Gaussians.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureStats", "check_protocols", "frechet_distance"]


def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


class FeatureStats:
    """Streaming mean and covariance of feature vectors, kept as (count, mean, M2) in float64.

    M2 is the centred sum of outer products, sum_i (x_i - mean)(x_i - mean)^T; batches and partial statistics are
    combined with the pairwise update of Chan, Golub & LeVeque (1979), which stays exact without large raw sums.
    """

    def __init__(self, num_features: int | None = None) -> None:
        self.num_features = num_features
        self.count = 0
        self._mean: np.ndarray | None = None  # (D,)
        self._m2: np.ndarray | None = None  # (D, D)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features, shape (N, D)."""
        x = _as_float64(features)
        if x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {x.shape}")
        if x.shape[0] == 0:
            return self
        mean = x.mean(axis=0)
        xc = x - mean
        return self._combine(x.shape[0], mean, xc.T @ xc)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another partial statistic into this one (in place); returns self."""
        if other.count == 0:
            return self
        return self._combine(other.count, other._mean, other._m2)

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> FeatureStats:
        dim = mean.shape[0]
        if self.num_features is None:
            self.num_features = dim
        elif dim != self.num_features:
            raise ValueError(f"feature dimension {dim} does not match {self.num_features}")
        if self.count == 0:
            self.count, self._mean, self._m2 = int(count), mean.copy(), m2.copy()
            return self
        # Chan et al. 1979: delta = mean_b - mean_a; M2 = M2_a + M2_b + delta delta^T n_a n_b / n
        n_a, n_b = self.count, int(count)
        n = n_a + n_b
        delta = mean - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n
        return self

    @property
    def mean(self) -> np.ndarray:
        """(D,) float64."""
        if self.count == 0:
            raise ValueError("no features have been added")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """(D, D) float64, unbiased (divides by N - 1)."""
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 features, have {self.count}")
        m2 = self._m2 / (self.count - 1)
        return (m2 + m2.T) / 2

    def all_reduce(self) -> FeatureStats:
        """Combine the statistics of every process (in place) when torch.distributed is initialised; every rank
        must call it (also one with no features), and all end with the same values.

        Three float64 all-reduces, no features and no pickles: the dimension (max), then the count and the sum of
        the features (sum), which give the global mean m, then sum over ranks of M2_r + n_r (m_r - m)(m_r - m)^T
        (sum), the exact M2 of the union (Chan et al. 1979, with every rank's mean taken against m)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        dim = torch.tensor([float(self.num_features or 0)], dtype=torch.float64, device=device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
        dim = int(dim.item())
        if dim == 0:
            return self  # no rank has any features
        if self.num_features not in (None, dim):
            raise ValueError(f"feature dimension {self.num_features} does not match another rank's {dim}")
        mean = self._mean if self.count else np.zeros(dim)
        sums = torch.from_numpy(np.concatenate([[float(self.count)], mean * self.count])).to(device)
        dist.all_reduce(sums)
        sums = sums.cpu().numpy()
        count = int(round(sums[0]))
        total_mean = sums[1:] / max(count, 1)
        delta = mean - total_mean
        m2 = (self._m2 if self.count else np.zeros((dim, dim))) + np.outer(delta, delta) * self.count
        m2 = torch.from_numpy(m2).to(device)
        dist.all_reduce(m2)
        self.num_features, self.count = dim, count
        self._mean, self._m2 = (total_mean, m2.cpu().numpy()) if count else (None, None)
        return self

    def save(self, path: str | os.PathLike, protocol: dict[str, Any]) -> None:
        """Write mu, sigma, count and the protocol (weights hash, frames, resize, number of videos...) to .npz."""
        with open(path, "wb") as f:  # an open file: np.savez would otherwise append ".npz" to the name
            np.savez(
                f,
                mu=self.mean,
                sigma=self.covariance,
                count=np.int64(self.count),
                protocol=np.array(json.dumps(protocol, sort_keys=True)),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[FeatureStats, dict[str, Any]]:
        """Read statistics written by `save`; returns (stats, protocol). The result can still be merged."""
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            count = int(data["count"])
            protocol = json.loads(str(data["protocol"]))
        stats = cls(mu.shape[0])
        stats.count, stats._mean, stats._m2 = count, mu, sigma * (count - 1)
        return stats, protocol


_MISSING = object()


def check_protocols(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Raise ValueError naming every key whose value differs (or is missing on one side) between two protocols."""
    a, b = (json.loads(json.dumps(p, sort_keys=True)) for p in (a, b))  # tuples and lists compare alike
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))
    if differing:
        details = ", ".join(f"{k}: {a.get(k, '<missing>')!r} vs {b.get(k, '<missing>')!r}" for k in differing)
        raise ValueError(f"statistics were computed under different protocols; differing keys: {details}")



def _clip_noise(eig: np.ndarray) -> np.ndarray:
    """Zero eigenvalues below the rounding floor D * eps * max|eig| (the np.linalg.matrix_rank tolerance).

    A singular covariance (fewer videos than feature dimensions) has null eigenvalues that come out as +-eps-sized
    noise; sqrt would amplify them to sqrt(eps)-sized errors in tr((S1 S2)^{1/2}), so they are treated as exact zeros.
    """
    floor = eig.shape[0] * np.finfo(np.float64).eps * np.abs(eig).max(initial=0.0)
    return np.where(eig > floor, eig, 0.0)


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu: (D,), sigma: (D, D).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})   (Heusel et al. 2017, FID; Unterthiner et al.
    2018, FVD). tr((S1 S2)^{1/2}) is the sum of sqrt of the eigenvalues of the symmetric PSD matrix
    S1^{1/2} S2 S1^{1/2} (similar to S1 S2), so only symmetric eigensolvers are needed, all in float64; eigenvalues
    under the rounding floor count as zero, so singular covariances (N <= D) give exact results too.
    """
    mu1, mu2 = _as_float64(mu1), _as_float64(mu2)
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(_clip_noise(w))) @ v.T
    m = s1_half @ s2 @ s1_half
    tr_covmean = np.sqrt(_clip_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
