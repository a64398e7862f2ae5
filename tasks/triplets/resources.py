"""Sizing the stages' actor pools: which stages share an actor, how many actors each pool gets
and what each asks of Ray.

Every model stage is an actor pool. The numpy-only stages (mask filter, foreground and dilation)
run inside the actors of the model stage that follows them: a pool of their own would cost a
process and an object-store round trip of every image for a millisecond of work.

Defaults, when a stage's options leave them out:

- every stage but inpainting gets one actor with a small CPU share (``LIGHT_CPUS`` at most): on the tiny
  and the sd15 presets alike they are a few per cent of the work;
- inpainting (~95 % of the compute) asking for GPUs gets a pool that grows from one actor to as
  many as the GPUs hold;
- inpainting on CPUs gets a pool of about 80 % of the CPUs' count, started whole (an autoscaled
  pool adds its second actor only once a backlog has built up, far too late for a short job), and
  shares what the other stages and the job's own tasks leave.

Explicit options win. A request that can never fit beside the job's read and write tasks is an
error before any work starts: Ray Data would otherwise wait for CPUs forever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TASK_CPUS = 0.25  # each of the job's plain tasks: shard reads, staging writes, shard assembly
LIGHT_CPUS = 0.1
HEAVY_STAGE = "inpaint"
MIN_HEAVY_CPUS = 0.25
GPU_ACTOR_CPUS = 0.5


class ResourceError(ValueError):
    """The stages' actor pools cannot all start on the cluster's resources."""


@dataclass(frozen=True)
class PoolPlan:
    """One stage's actor pool as handed to ``map_batches``."""

    num_cpus: float
    num_gpus: float
    min_actors: int
    max_actors: int

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per actor: the whole CPUs it reserved, at least one."""
        return max(1, int(self.num_cpus))


def pool_groups(names: Sequence[str], model_free: set[str]) -> list[list[str]]:
    """Consecutive stages per actor pool: each model stage with the model-free stages before it
    (trailing model-free stages form a pool of their own). The pool is named by its last stage."""
    groups: list[list[str]] = []
    pending: list[str] = []
    for name in names:
        pending.append(name)
        if name not in model_free:
            groups.append(pending)
            pending = []
    return groups + ([pending] if pending else [])


def plan_pools(names: Sequence[str], options: Mapping[str, Any], total_cpus: float,
               total_gpus: float = 0.0, batches: int | None = None) -> dict[str, PoolPlan]:
    """A ``PoolPlan`` per pool, named in ``names`` (the pools' last stages); ``options[name]`` is that
    stage's ``StageOptions`` (or absent). ``batches``: the job's number of inpainting batches, so that
    a short job does not start actors that would get no work."""
    plans: dict[str, PoolPlan] = {}
    light = min(LIGHT_CPUS, math.floor(total_cpus * 0.4 / max(1, len(names)) * 1000) / 1000)
    for name in names:
        if name == HEAVY_STAGE:
            continue
        opt = options.get(name)
        gpus = float(getattr(opt, "num_gpus", 0.0) or 0.0)
        cpus = _explicit(opt, "num_cpus") or (GPU_ACTOR_CPUS if gpus else light)
        lo, hi = _actors(name, opt, gpus, total_gpus, default=None if gpus else 1)
        plans[name] = PoolPlan(cpus, gpus, lo, hi)
    if HEAVY_STAGE in names:
        plans[HEAVY_STAGE] = _plan_heavy(options.get(HEAVY_STAGE), plans, total_cpus, total_gpus, batches)
    return {name: plans[name] for name in names}


def _plan_heavy(opt: Any, others: Mapping[str, PoolPlan], total_cpus: float, total_gpus: float,
                batches: int | None) -> PoolPlan:
    gpus = float(getattr(opt, "num_gpus", 0.0) or 0.0)
    cpus = _explicit(opt, "num_cpus")
    if gpus:
        lo, hi = _actors(HEAVY_STAGE, opt, gpus, total_gpus, default=None)
        return PoolPlan(cpus or GPU_ACTOR_CPUS, gpus, lo, hi)
    left = total_cpus - 2 * TASK_CPUS - sum(p.num_cpus * p.min_actors for p in others.values())
    if _explicit(opt, "min_actors") or _explicit(opt, "max_actors"):
        lo, hi = _actors(HEAVY_STAGE, opt, 0.0, total_gpus, default=1)
    else:
        lo = hi = max(1, min(round(total_cpus * 0.8), int(left / (cpus or MIN_HEAVY_CPUS)), batches or 1 << 30))
    if cpus is None:
        cpus = max(0.01, math.floor(left / lo * 100) / 100)
    return PoolPlan(cpus, 0.0, lo, hi)


def _actors(name: str, opt: Any, gpus: float, total_gpus: float, default: int | None) -> tuple[int, int]:
    lo, hi = _explicit(opt, "min_actors"), _explicit(opt, "max_actors")
    if lo is None and hi is None and default is None:  # a GPU pool: grow to what the GPUs hold
        return 1, max(1, int(total_gpus / gpus + 1e-9))
    lo = lo or 1
    hi = hi or max(lo, default or 1)
    if lo > hi:
        raise ResourceError(f"stage {name!r}: min_actors {lo} > max_actors {hi}")
    return lo, hi


def _explicit(opt: Any, field: str) -> Any:
    return getattr(opt, field, None) if opt is not None else None


def check_fits(plans: Mapping[str, PoolPlan], total_cpus: float, total_gpus: float = 0.0) -> None:
    """Raises ``ResourceError`` when the pools' smallest sizes and two job tasks exceed the cluster."""
    cpus = sum(p.num_cpus * p.min_actors for p in plans.values()) + 2 * TASK_CPUS
    gpus = sum(p.num_gpus * p.min_actors for p in plans.values())
    detail = ", ".join(f"{n} {p.min_actors}x({p.num_cpus:g} CPU, {p.num_gpus:g} GPU)" for n, p in plans.items())
    if cpus > total_cpus + 1e-9:
        raise ResourceError(f"the stages' actors and the job's tasks need {cpus:g} CPUs, the cluster has "
                            f"{total_cpus:g} ({detail}); lower num_cpus or min_actors")
    if gpus > total_gpus + 1e-9:
        raise ResourceError(f"the stages' actors need {gpus:g} GPUs, the cluster has {total_gpus:g} ({detail}); "
                            "lower num_gpus or min_actors")
