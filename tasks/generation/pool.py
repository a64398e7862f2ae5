"""Ray Data plumbing shared by batch generation and GLoD sweeps: pre-formed groups of rows go to
an actor pool (models loaded once per actor), one group per call, and results stream back.

A group is formed by the job's plan, not by Ray Data's batching, so which rows share a UNet batch
never depends on the number of actors or on timing: a rerun writes the same bytes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

WORKER_CLASSES: dict[str, Callable[..., Any]] = {}


class GroupActor:
    """Builds the job's worker once (``kind`` + kwargs) and maps ``{"shard", "group"}`` batches
    to ``{"shard", "result", "png"}`` rows, one per row of each group."""

    def __init__(self, kind: str, kwargs: dict[str, Any]) -> None:
        from tasks.generation.workers import build_worker

        self.worker = build_worker(kind, kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        shards, results, pngs = [], [], []
        for shard, group in zip(batch["shard"], batch["group"]):
            for result, png in self.worker(json.loads(group)):
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
