"""Fréchet distance (FID) from mergeable sufficient statistics.

A set of feature vectors is summarised by ``n``, ``Σf`` and ``Σffᵀ`` in float64 (the state layout
of torchmetrics' FID): partial statistics of any partition of the set add up to the statistics of
the whole set, so one worker or a hundred give the same number, and no worker ever holds every
feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FrechetStats:
    """``n``, ``Σf`` ``(D,)`` and ``Σffᵀ`` ``(D, D)`` of a set of features, float64."""

    n: int
    sum: np.ndarray
    outer_sum: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "FrechetStats":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> "FrechetStats":
        """Statistics of ``(N, D)`` features."""
        f = _as_float64(features)
        return cls(f.shape[0], f.sum(axis=0), f.T @ f)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, features: np.ndarray | torch.Tensor) -> "FrechetStats":
        """Fold ``(N, D)`` features in (in place); returns self."""
        f = _as_float64(features)
        if f.shape[1] != self.dim:
            raise ValueError(f"cannot merge statistics of {self.dim}-d and {f.shape[1]}-d features")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer_sum += f.T @ f  # in place: no (D, D) temporaries beyond the product
        return self

    def merge(self, other: "FrechetStats") -> "FrechetStats":
        """Statistics of the union of the two sets."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {self.dim}-d and {other.dim}-d features")
        return FrechetStats(self.n + other.n, self.sum + other.sum, self.outer_sum + other.outer_sum)

    __add__ = merge

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (``n - 1``, as numpy and torchmetrics); needs ``n >= 2``."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 samples per set, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer_sum - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean, cov

    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays, for :func:`cnc_model.metrics.stats_io.dump`."""
        return {"n": np.array(self.n, np.int64), "sum": self.sum, "outer_sum": self.outer_sum}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "FrechetStats":
        total, outer = np.asarray(state["sum"], np.float64), np.asarray(state["outer_sum"], np.float64)
        if total.ndim != 1 or outer.shape != (total.shape[0], total.shape[0]):
            raise ValueError(f"inconsistent FID statistics: sum {total.shape}, outer_sum {outer.shape}")
        return cls(int(state["n"]), total, outer)


def frechet_distance(a: FrechetStats, b: FrechetStats) -> float:
    """``‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)``, the trace of the square root taken as the sum
    of the square roots of the eigenvalues of ``Σa Σb`` (as torchmetrics), in float64."""
    mu_a, cov_a = a.mean_cov()
    mu_b, cov_b = b.mean_cov()
    diff = float(np.square(mu_a - mu_b).sum())
    eig = torch.linalg.eigvals(torch.from_numpy(cov_a @ cov_b))
    sqrt_trace = float(eig.sqrt().real.sum())
    return diff + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * sqrt_trace


def _as_float64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    return f
