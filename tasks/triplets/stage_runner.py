"""Runs triplet stages inside a Ray Data actor: loads their models once, times every batch, and
exports per-stage Ray metrics (samples, rejects by reason, batch latency, in-flight batches) that
the Ray dashboard and its Prometheus endpoint show."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

def stage_class(name: str) -> type:
    from tasks.triplets.stages import STAGE_CLASSES

    if name not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_CLASSES)}")
    return STAGE_CLASSES[name]


class _StageMetrics:
    """Ray custom metrics for one stage (no-ops outside a Ray worker)."""

    def __init__(self, stage: str):
        from tasks.ray_runtime import ray_metrics

        self.tags = {"stage": stage}
        metrics = ray_metrics()
        self.enabled = metrics is not None
        if not self.enabled:
            return
        Counter, Gauge, Histogram = metrics.Counter, metrics.Gauge, metrics.Histogram
        self.samples = Counter("cnc_triplets_samples_total", "samples through a stage", tag_keys=("stage",))
        self.rejects = Counter("cnc_triplets_rejects_total", "rejects made by a stage", tag_keys=("stage", "reason"))
        self.rate = Gauge("cnc_triplets_samples_per_second", "a stage's throughput on its last batch",
                          tag_keys=("stage",))
        self.in_flight = Gauge("cnc_triplets_in_flight_batches", "batches a stage is working on", tag_keys=("stage",))
        self.latency = Histogram("cnc_triplets_batch_seconds", "time per batch", boundaries=[0.01, 0.1, 1, 10, 60],
                                 tag_keys=("stage",))

    def start(self) -> None:
        if self.enabled:
            self.in_flight.set(1, tags=self.tags)

    def done(self, n: int, seconds: float, new_rejects: list[str]) -> None:
        if not self.enabled:
            return
        self.in_flight.set(0, tags=self.tags)
        self.samples.inc(n, tags=self.tags)
        self.latency.observe(seconds, tags=self.tags)
        if seconds > 0:
            self.rate.set(n / seconds, tags=self.tags)
        for reason in new_rejects:
            self.rejects.inc(1, tags={**self.tags, "reason": reason})


class StageRunner:
    """The callable class handed to ``Dataset.map_batches``: one or more consecutive stages in one
    actor, then optionally ``finish`` (the job's staging write) on the result.

    ``stages`` is a list of ``(name, cfg)``; ``cfg`` goes to the stage's constructor (e.g.
    ``batch_size``). Per-stage seconds come back in the ``_t_<name>`` columns (per row), the process
    that ran each stage (``host:pid``) in ``_w_<name>``."""

    def __init__(self, stages: list[tuple[str, dict[str, Any]]], preset: str, torch_threads: int | None = None,
                 finish: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None):
        self.stages = [(name, stage_class(name)(preset=preset, **(cfg or {})), _StageMetrics(name))
                       for name, cfg in stages]
        self.finish = finish
        self.torch_threads = torch_threads
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # per call: in the local executor several runners with their own counts share one process
        if self.torch_threads and "torch" in sys.modules:  # the numpy-only stages skip torch's import
            torch = sys.modules["torch"]
            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
        n = len(batch["key"])
        for name, stage, metrics in self.stages:
            before = np.asarray(batch["reject"]).copy()
            metrics.start()
            t0 = time.perf_counter()
            batch = stage(batch)
            seconds = time.perf_counter() - t0
            new = [str(a) for b, a in zip(before, batch["reject"]) if not b and a]
            metrics.done(n, seconds, new)
            batch[f"_t_{name}"] = np.full(n, seconds / max(n, 1), dtype=np.float64)
            batch[f"_w_{name}"] = np.full(n, self.worker, dtype=object)
        return self.finish(batch) if self.finish else batch
