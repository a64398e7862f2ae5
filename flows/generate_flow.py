"""Prefect flow ``generate-batch``: one Ray Data job turns a job table into image shards."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import publish_counts
from flows.generation_params import GenerateBatchParams


@task(name="generate-shards", retries=2, retry_delay_seconds=5)
def generate_shards(params: GenerateBatchParams) -> dict[str, Any]:
    """The actor-pool job; a retry (resume) redoes only the shards not yet committed."""
    from tasks.generation.job import GenerationConfig, run_generation

    cfg = GenerationConfig(params.rows, params.out.rstrip("/"), params.model, params.condition_root,
                           params.shard_size, params.batch_size, params.actors, params.gpus_per_actor, params.device)
    return asdict(run_generation(cfg, executor=params.executor, resume=True))


@flow(name="generate-batch", log_prints=True)
def generate_batch(params: GenerateBatchParams) -> dict[str, Any]:
    """Generate every row of a job table with CnC (cluster batch generation)."""
    result = generate_shards(params)
    counts = {"inputs": result["rows"], "images": result["images"], "rejects": result["rejects"],
              "shards": len(result["shard_urls"]), "shards skipped": result["shards_skipped"]}
    publish_counts("generate-batch", f"Images from {params.rows}", counts, result["rejects_by_reason"],
                   result["seconds"])
    get_run_logger().info("generate-batch: %s", counts)
    return result
