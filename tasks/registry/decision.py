"""Whether a candidate model replaces the champion: one metric, a margin, and a table of all.

Pure (no storage, no Prefect): the retraining flow evaluates both models on one frozen set and
hands the two metric dicts here; the returned table is what it publishes as an artifact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Metrics where a smaller number is better; anything else is taken as larger-is-better.
LOWER_IS_BETTER = ("fid", "kid", "loss", "lpips", "mse", "error")


@dataclass(frozen=True)
class Decision:
    """The verdict, why, and one row per metric (decision metric first)."""

    promote: bool
    reason: str
    metric: str
    improvement: float | None
    table: list[dict[str, Any]] = field(default_factory=list)


def lower_is_better(metric: str) -> bool:
    """Direction of a metric from its name (``fid``, ``val_loss`` ... are lower-is-better)."""
    name = metric.lower()
    return any(token in name for token in LOWER_IS_BETTER)


def decide_promotion(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, metric: str,
                     margin: float = 0.0, *, relative: bool = False,
                     higher_is_better: bool | None = None) -> Decision:
    """Promote only if the candidate beats the champion on ``metric`` by more than ``margin``.

    ``margin`` is in the metric's units, or a fraction of the champion's value when ``relative``.
    The direction comes from the metric's name unless ``higher_is_better`` is given. No champion
    yet: promote. A missing or non-finite value on either side: keep the champion, and say so.
    """
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    higher = (not lower_is_better(metric)) if higher_is_better is None else higher_is_better
    table = comparison_table(candidate, champion or {}, metric, higher)
    cand = _number(candidate.get(metric))
    if cand is None:
        return Decision(False, f"candidate has no finite {metric} ({candidate.get(metric)!r}): champion kept",
                        metric, None, table)
    if champion is None:
        return Decision(True, f"no champion yet: candidate promoted ({metric} {cand:.6g})", metric, None, table)
    champ = _number(champion.get(metric))
    if champ is None:
        return Decision(False, f"champion has no finite {metric} ({champion.get(metric)!r}): cannot compare, "
                        "champion kept", metric, None, table)
    gain = (cand - champ) if higher else (champ - cand)
    if relative:
        if champ == 0:
            return Decision(False, f"relative margin on a champion {metric} of 0 is undefined: champion kept",
                            metric, None, table)
        gain /= abs(champ)
    unit = " (relative)" if relative else ""
    direction = "higher" if higher else "lower"
    if gain > margin:
        return Decision(True, f"candidate {metric} {cand:.6g} vs champion {champ:.6g} ({direction} is better): "
                        f"improvement {gain:.6g}{unit} > margin {margin:g}: promoted", metric, gain, table)
    return Decision(False, f"candidate {metric} {cand:.6g} vs champion {champ:.6g} ({direction} is better): "
                    f"improvement {gain:.6g}{unit} <= margin {margin:g}: champion kept", metric, gain, table)


def comparison_table(candidate: Mapping[str, Any], champion: Mapping[str, Any], metric: str,
                     higher: bool) -> list[dict[str, Any]]:
    """Rows ``metric, champion, candidate, delta, better``: the decision metric first, then the rest
    sorted; ``better`` names the side that wins on that metric (by its own direction)."""
    names = [metric] + sorted((set(candidate) | set(champion)) - {metric})
    rows = []
    for name in names:
        a, b = _number(champion.get(name)), _number(candidate.get(name))
        if name not in candidate and name not in champion:
            continue
        hi = higher if name == metric else not lower_is_better(name)
        better = None
        if a is not None and b is not None:
            better = "tie" if a == b else ("candidate" if (b > a) == hi else "champion")
        rows.append({"metric": name, "decides": name == metric, "champion": a, "candidate": b,
                     "delta": None if a is None or b is None else b - a, "better": better})
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
