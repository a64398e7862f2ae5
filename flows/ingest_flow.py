"""Prefect flow ``ingest``: source images -> WebDataset shards, on Ray or a process pool."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import publish_counts
from flows.params import IngestParams


@task(name="ingest-shards", retries=2, retry_delay_seconds=5)
def ingest_shards(params: IngestParams) -> dict[str, Any]:
    """Runs the whole ingest job. A retry resumes: committed shards are skipped."""
    from tasks.ingest import run_ingest

    result = run_ingest(params.source_format, params.source, params.out, size=params.size,
                        shard_size=params.shard_size, quality=params.quality, limit=params.limit, resume=True,
                        extend=params.extend, executor=params.executor)
    return asdict(result)


@flow(name="ingest", log_prints=True)
def ingest(params: IngestParams) -> dict[str, Any]:
    """Shard a source into WebDataset tars with an index, a rejects table and a manifest."""
    from tasks.redact import install_log_redaction

    install_log_redaction()
    result = ingest_shards(params)
    counts = {"inputs": result["num_inputs"], "samples": result["num_samples"], "rejects": result["num_rejects"],
              "shards": len(result["shard_urls"]), "inputs this run": result["num_inputs_run"]}
    publish_counts("ingest", f"Ingest of {params.source}", counts, result["rejects_by_reason"], result["seconds"],
                   inputs=result["num_inputs_run"])
    get_run_logger().info("ingest: %s -> %s: %s", params.source, params.out, counts)
    return result
