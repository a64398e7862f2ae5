"""Prefect flow ``glod-sweep``: render and score a GLoD sweep; the results table as an artifact."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import publish_counts
from flows.generation_params import GLoDSweepParams


@task(name="render-sweep", retries=2, retry_delay_seconds=5)
def render_sweep(params: GLoDSweepParams) -> dict[str, Any]:
    from tasks.generation.sweep_job import run_sweep

    return asdict(run_sweep(params.sweep, params.out, clip=params.clip, shard_size=params.shard_size,
                            actors=params.actors, gpus_per_actor=params.gpus_per_actor, device=params.device,
                            executor="ray", resume=True))


@flow(name="glod-sweep", log_prints=True)
def glod_sweep(params: GLoDSweepParams) -> dict[str, Any]:
    """GLoD specs x a grid of weights, step ranges, layout strengths and seeds, scored by CLIP."""
    import pyarrow.parquet as pq

    from tasks import storage

    result = render_sweep(params)
    counts = {"inputs": result["rows"], "images": result["images"], "rejects": result["rejects"]}
    publish_counts("glod-sweep", f"GLoD sweep {params.sweep}", counts, result["rejects_by_reason"], result["seconds"])
    fs, path = storage.get_fs(result["results_url"])
    with fs.open(path, "rb") as fh:
        rows = pq.read_table(fh).to_pylist()
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:500]]
    create_table_artifact(key="glod-sweep-results", table=table or [{"id": "(none)"}],
                          description="grid point, global/local alignment, Pareto front (first 500 rows)")
    create_markdown_artifact(key="glod-sweep-figures", description="contact sheets and alignment plot",
                             markdown="\n".join(["# GLoD sweep figures", ""] + [f"- `{u}`" for u in result["figure_urls"]]))
    get_run_logger().info("glod-sweep: %s", counts)
    return result
