"""Means that merge: CLIPScore, depth error and exemplar similarity as a sum and a count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MeanStats:
    """``Σx``, ``Σx²`` and the count of a set of scalar scores (float64)."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    @classmethod
    def from_values(cls, values: np.ndarray | torch.Tensor | list[float]) -> "MeanStats":
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        v = np.asarray(values, np.float64).reshape(-1)
        if not np.isfinite(v).all():
            raise ValueError("scores contain NaN or infinite values")
        return cls(float(v.sum()), float(np.square(v).sum()), int(v.size))

    def merge(self, other: "MeanStats") -> "MeanStats":
        return MeanStats(self.total + other.total, self.total_sq + other.total_sq, self.count + other.count)

    __add__ = merge

    def mean(self) -> float:
        """The mean; NaN for an empty set (a setting with nothing to score)."""
        return self.total / self.count if self.count else float("nan")

    def std(self) -> float:
        """Population standard deviation; NaN for an empty set."""
        if not self.count:
            return float("nan")
        return float(np.sqrt(max(self.total_sq / self.count - self.mean() ** 2, 0.0)))

    def state(self) -> dict[str, np.ndarray]:
        return {"total": np.array(self.total), "total_sq": np.array(self.total_sq), "count": np.array(self.count, np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "MeanStats":
        return cls(float(state["total"]), float(state["total_sq"]), int(state["count"]))


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIPScore per pair (Hessel et al., as torchmetrics): ``100 · max(cos(image, text), 0)``."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100.0 * cos.clamp_min(0.0)
