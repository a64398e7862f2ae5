"""Ray Data plumbing shared by batch generation and GLoD sweeps: pre-formed groups of rows go to
an actor pool (models loaded once per actor), one group per call, and results stream back.

A group is formed by the job's plan, not by Ray Data's batching, so which rows share a UNet batch
never depends on the number of actors or on timing: a rerun writes the same bytes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator


class JobMetrics:
    """Ray custom metrics of a generation job, tagged with its kind (``cnc`` or ``glod``): rows
    done, images, rejects by reason, and images/s of the last group. No-ops outside Ray."""

    def __init__(self, kind: str) -> None:
        from tasks.ray_runtime import ray_metrics

        self.tags = {"kind": kind}
        metrics = ray_metrics()
        self.enabled = metrics is not None
        if not self.enabled:
            return
        self.rows = metrics.Counter("cnc_generation_rows_total", "rows done (image or reject)", tag_keys=("kind",))
        self.images = metrics.Counter("cnc_generation_images_total", "images made", tag_keys=("kind",))
        self.rejects = metrics.Counter("cnc_generation_rejects_total", "rows rejected", tag_keys=("kind", "reason"))
        self.rate = metrics.Gauge("cnc_generation_images_per_second", "an actor's images/s on its last group",
                                  tag_keys=("kind",))

    def record(self, results: list[dict[str, Any]], images: int, seconds: float) -> None:
        if not self.enabled:
            return
        self.rows.inc(len(results), tags=self.tags)
        if images:
            self.images.inc(images, tags=self.tags)
        if seconds > 0:
            self.rate.set(images / seconds, tags=self.tags)
        for result in results:
            if result.get("reason"):
                self.rejects.inc(1, tags={**self.tags, "reason": result["reason"]})


class GroupActor:
    """Builds the job's worker once (``kind`` + kwargs) and maps ``{"shard", "group"}`` batches
    to ``{"shard", "result", "png"}`` rows, one per row of each group."""

    def __init__(self, kind: str, kwargs: dict[str, Any]) -> None:
        from tasks.generation.workers import build_worker

        self.worker = build_worker(kind, kwargs)
        self.metrics = JobMetrics(kind)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        shards, results, pngs = [], [], []
        for shard, group in zip(batch["shard"], batch["group"]):
            t0 = time.perf_counter()
            out = self.worker(json.loads(group))
            self.metrics.record([r for r, _ in out], sum(1 for _, png in out if png), time.perf_counter() - t0)
            for result, png in out:
                shards.append(int(shard))
                results.append(json.dumps(result))
                pngs.append(png or b"")
        return {"shard": shards, "result": results, "png": pngs}


def run_groups(items: list[dict[str, Any]], kind: str, kwargs: dict[str, Any], actors: int,
               gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0) -> Iterator[dict[str, Any]]:
    """Stream ``{"shard", "result", "png"}`` for every row of ``items`` (``{"shard", "group"}``)."""
    import ray

    from tasks.ray_runtime import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * actors)))
    ds = ds.map_batches(GroupActor, fn_constructor_args=(kind, kwargs), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
                        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    yield from ds.iter_rows()
