"""Inception Score from mergeable per-split statistics.

The Inception Score splits the images into ``K`` groups and averages ``exp(E_i KL(p_i ‖ p̄))`` over
the groups. torchmetrics keeps every logit and splits a random permutation; here an image's split
is a hash of its key, so the split does not depend on which worker saw the image, and each split
keeps only ``count``, ``Σp`` and ``Σ p log p``, which add up across workers exactly. Per split:

    E_i KL(p_i ‖ p̄) = (Σ_i Σ_c p_ic log p_ic) / n − Σ_c p̄_c log p̄_c,   p̄ = Σ_i p_i / n
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

DEFAULT_SPLITS = 10
"""Splits of the published Inception Score (and torchmetrics' default)."""


def split_of(key: str, splits: int) -> int:
    """The split of the image called ``key``: stable across runs, machines and partitions."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % splits


@dataclass
class InceptionScoreStats:
    """Per split: ``count`` ``(K,)``, ``Σp`` ``(K, C)`` and ``Σ p log p`` ``(K,)``, float64."""

    count: np.ndarray
    sum_p: np.ndarray
    sum_plogp: np.ndarray

    @classmethod
    def empty(cls, num_classes: int, splits: int = DEFAULT_SPLITS) -> "InceptionScoreStats":
        return cls(np.zeros(splits, np.int64), np.zeros((splits, num_classes), np.float64), np.zeros(splits, np.float64))

    @classmethod
    def from_logits(cls, logits: np.ndarray | torch.Tensor, keys: Sequence[str],
                    splits: int = DEFAULT_SPLITS) -> "InceptionScoreStats":
        """Statistics of ``(N, C)`` classifier logits of the images ``keys``."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().cpu().double().numpy()
        logits = np.asarray(logits, np.float64)
        if logits.ndim != 2 or logits.shape[0] != len(keys):
            raise ValueError(f"logits must be (N, C) with one key per row: {logits.shape}, {len(keys)} keys")
        if not np.isfinite(logits).all():
            raise ValueError("logits contain NaN or infinite values")
        log_p = logits - logits.max(axis=1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        plogp = (p * log_p).sum(axis=1)
        stats = cls.empty(logits.shape[1], splits)
        idx = np.array([split_of(k, splits) for k in keys], np.int64)
        np.add.at(stats.count, idx, 1)
        np.add.at(stats.sum_p, idx, p)
        np.add.at(stats.sum_plogp, idx, plogp)
        return stats

    @property
    def splits(self) -> int:
        return self.count.shape[0]

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def merge(self, other: "InceptionScoreStats") -> "InceptionScoreStats":
        """Statistics of the union of the two sets (same splits and classes)."""
        if other.sum_p.shape != self.sum_p.shape:
            raise ValueError(f"cannot merge IS statistics of shapes {self.sum_p.shape} and {other.sum_p.shape}")
        return InceptionScoreStats(self.count + other.count, self.sum_p + other.sum_p,
                                   self.sum_plogp + other.sum_plogp)

    __add__ = merge

    def split_scores(self) -> np.ndarray:
        """``exp(E KL)`` of every non-empty split."""
        used = self.count > 0
        if not used.any():
            raise ValueError("Inception Score of an empty set")
        n = self.count[used].astype(np.float64)
        mean_p = self.sum_p[used] / n[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(mean_p > 0, mean_p * np.log(mean_p), 0.0).sum(axis=1)
        return np.exp(self.sum_plogp[used] / n - cross)

    def score(self) -> tuple[float, float]:
        """Mean and standard deviation (unbiased, as torchmetrics; 0 for one split) over splits."""
        scores = self.split_scores()
        std = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        return float(scores.mean()), std

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "sum_p": self.sum_p, "sum_plogp": self.sum_plogp}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "InceptionScoreStats":
        count = np.asarray(state["count"], np.int64)
        sum_p, sum_plogp = np.asarray(state["sum_p"], np.float64), np.asarray(state["sum_plogp"], np.float64)
        if sum_p.ndim != 2 or sum_p.shape[0] != count.shape[0] or sum_plogp.shape != count.shape:
            raise ValueError(f"inconsistent IS statistics: count {count.shape}, sum_p {sum_p.shape}")
        return cls(count, sum_p, sum_plogp)
