"""Sizing the stages' actor pools: which stages share an actor, how many actors each pool gets
and what each asks of Ray.

Every model stage is an actor pool. The numpy-only stages (mask filter, foreground and dilation)
run inside the actors of the model stage that follows them: a pool of their own would cost a
process and an object-store round trip of every image for a millisecond of work.

Defaults, when a stage's options leave them out, on a local Ray (fixed resources):

- inpainting (~95 % of the compute) on CPUs: a pool of about 80 % of the CPUs' count (at most one
  actor per batch of the job), started whole (an autoscaled pool adds its second actor only once
  a backlog has built up, far too late for a short job), sharing what the other pools and the
  job's own tasks leave;
- every other CPU pool: one actor with a small CPU share (``LIGHT_CPUS`` at most); when
  inpainting runs on GPUs, the CPU pools share the CPUs instead (U2-Net and DPT at 512 px on one
  thread would hold a GPU back);
- a pool asking for GPUs: 1 to as many actors as the GPUs hold.

On a joined cluster, which may autoscale, pools without explicit sizes grow from one actor with no
upper bound (Ray Data adds actors while the cluster can place them), inpainting actors ask for one
CPU each.

Torch threads per actor are ``int(num_cpus)`` when ``num_cpus`` is given, else one: never derived
from a default share, so that the thread count (on which float rounding, hence the output bytes,
depend) is the same for every job size and for the local executor.

Explicit options win. A request that can never fit beside the job's tasks on a local Ray is an
error before any work starts: Ray Data would otherwise wait for resources forever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TASK_CPUS = 0.25  # each of the job's plain tasks: shard reads, staging writes, shard assembly
LIGHT_CPUS = 0.1
MIN_CPUS = 0.01
HEAVY_STAGE = "inpaint"
MIN_HEAVY_CPUS = 0.25
GPU_ACTOR_CPUS = 0.5
# resident memory of one process holding every stage's models (fp32 on CPU), for the process pool's
# size: sd15's inpainting UNet/VAE/text encoder ~4.3 GiB, DPT-Large 1.3, CLIP ViT-L/14 1.7, U2-Net 0.2
WORKER_MEMORY_GIB = {"tiny": 1.0, "sd15": 8.0}


def pool_workers(cpus: int, threads: int, preset: str, memory_gib: float | None) -> int:
    """Worker processes of the ``processes`` executor: one per ``threads`` CPUs, no more than 80 %
    of the machine's memory holds at the preset's per-process footprint."""
    workers = max(1, cpus // max(1, threads))
    if memory_gib:
        workers = min(workers, max(1, int(memory_gib * 0.8 // WORKER_MEMORY_GIB.get(preset, 8.0))))
    return workers


class ResourceError(ValueError):
    """The stages' actor pools cannot all start on the cluster's resources."""


@dataclass(frozen=True)
class PoolPlan:
    """One pool as handed to ``map_batches``; ``max_actors`` None: no upper bound."""

    num_cpus: float
    num_gpus: float
    min_actors: int
    max_actors: int | None
    torch_threads: int = 1


def torch_threads(opt: Any) -> int:
    """Intra-op threads of a stage's actors: its explicit ``num_cpus`` (whole), else one."""
    cpus = _explicit(opt, "num_cpus")
    return max(1, int(cpus)) if cpus else 1


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


def plan_pools(names: Sequence[str], options: Mapping[str, Any], total_cpus: float, total_gpus: float = 0.0,
               batches: int | None = None, elastic: bool = False) -> dict[str, PoolPlan]:
    """A ``PoolPlan`` per pool, named in ``names`` (the pools' last stages); ``options[name]`` is that
    stage's ``StageOptions`` (or absent). ``batches``: the job's number of inpainting batches, so that
    a short job does not start actors that would get no work. ``elastic``: a joined cluster that
    may autoscale (see the module's docstring)."""
    light = max(MIN_CPUS, min(LIGHT_CPUS, math.floor(total_cpus * 0.4 / max(1, len(names)) * 1000) / 1000))
    plans: dict[str, PoolPlan] = {}
    for name in names:
        if name != HEAVY_STAGE:
            opt = options.get(name)
            gpus = _gpus(opt)
            lo, hi = _actors(name, opt, gpus, total_gpus, elastic)
            cpus = _explicit(opt, "num_cpus") or (GPU_ACTOR_CPUS if gpus else light)
            plans[name] = PoolPlan(cpus, gpus, lo, hi, torch_threads(opt))
    if HEAVY_STAGE in names:
        opt = options.get(HEAVY_STAGE)
        plans[HEAVY_STAGE] = _plan_heavy(opt, plans, total_cpus, total_gpus, batches, elastic)
        if _gpus(opt) and not elastic:
            _spread_cpus(plans, options, total_cpus)
    return {name: plans[name] for name in names}


def _plan_heavy(opt: Any, others: Mapping[str, PoolPlan], total_cpus: float, total_gpus: float,
                batches: int | None, elastic: bool) -> PoolPlan:
    gpus, cpus = _gpus(opt), _explicit(opt, "num_cpus")
    if gpus:
        lo, hi = _actors(HEAVY_STAGE, opt, gpus, total_gpus, elastic)
        return PoolPlan(cpus or GPU_ACTOR_CPUS, gpus, lo, hi, torch_threads(opt))
    if _sized(opt):
        lo, hi = _actors(HEAVY_STAGE, opt, 0.0, total_gpus, elastic)
    elif elastic:
        return PoolPlan(cpus or 1.0, 0.0, 1, None, torch_threads(opt))
    else:
        left = _left(total_cpus, others)
        lo = max(1, min(round(total_cpus * 0.8), int(left / (cpus or MIN_HEAVY_CPUS)), batches or 1 << 30))
        hi = lo
    if cpus is None:  # room for the pool at its largest
        cpus = max(MIN_CPUS, math.floor(_left(total_cpus, others) / (hi or lo) * 100) / 100)
    return PoolPlan(cpus, 0.0, lo, hi, torch_threads(opt))


def _spread_cpus(plans: dict[str, PoolPlan], options: Mapping[str, Any], total_cpus: float) -> None:
    """Inpainting is on GPUs: the CPU pools left at their defaults share the CPUs left over."""
    free = [n for n, p in plans.items() if n != HEAVY_STAGE and not p.num_gpus and not _sized(options.get(n))
            and _explicit(options.get(n), "num_cpus") is None]
    if not free:
        return
    share = (_left(total_cpus, {n: p for n, p in plans.items() if n not in free})) / len(free)
    if share < 1:
        return
    for name in free:
        k = max(1, int(share))
        plans[name] = PoolPlan(max(MIN_CPUS, math.floor(share / k * 100) / 100), 0.0, k, k, 1)


def _left(total_cpus: float, plans: Mapping[str, PoolPlan]) -> float:
    return total_cpus - 2 * TASK_CPUS - sum(p.num_cpus * p.min_actors for p in plans.values())


def _actors(name: str, opt: Any, gpus: float, total_gpus: float, elastic: bool) -> tuple[int, int | None]:
    lo, hi = _explicit(opt, "min_actors"), _explicit(opt, "max_actors")
    if lo is None and hi is None:
        if elastic:
            return 1, None
        return (1, max(1, int(total_gpus / gpus + 1e-9))) if gpus else (1, 1)
    lo = lo or 1
    hi = hi or lo
    if lo > hi:
        raise ResourceError(f"stage {name!r}: min_actors {lo} > max_actors {hi}")
    return lo, hi


def _gpus(opt: Any) -> float:
    return float(_explicit(opt, "num_gpus") or 0.0)


def _sized(opt: Any) -> bool:
    return _explicit(opt, "min_actors") is not None or _explicit(opt, "max_actors") is not None


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
