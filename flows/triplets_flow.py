"""Prefect flow ``build-triplets``: ingest, then the model stages as one Ray Data job."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import publish_counts
from flows.ingest_flow import ingest_shards
from flows.params import BuildTripletsParams, IngestParams
from tasks import storage


def triplet_stage_options(params: BuildTripletsParams) -> dict[str, Any]:
    from tasks.triplets.job import StageOptions

    opts = {name: StageOptions(**p.model_dump()) for name, p in params.stages.items()}
    inpaint = opts.get("inpaint", StageOptions())
    opts["inpaint"] = StageOptions(**{**asdict(inpaint), "cfg": {**inpaint.cfg,
                                                                 "num_inference_steps": params.inpaint_steps}})
    return opts


@task(name="triplet-stages", retries=2, retry_delay_seconds=5)
def triplet_stages(params: BuildTripletsParams, ingest_url: str) -> dict[str, Any]:
    """The saliency -> inpainting -> depth job. A retry resumes from the staged samples."""
    from tasks.triplets.job import run_triplets

    result = run_triplets(ingest_url, storage.join(params.out, "triplets"), preset=params.preset, clip=params.clip,
                          latents=params.latents, stages=triplet_stage_options(params), resume=True)
    return asdict(result)


@flow(name="build-triplets", log_prints=True)
def build_triplets(params: BuildTripletsParams) -> dict[str, Any]:
    """Build CnC training triplets {I_f, I_b, M} with depth maps from a source of images."""
    ingest_params = IngestParams(source_format=params.source_format, source=params.source,
                                 out=storage.join(params.out, "ingest"), size=params.size,
                                 shard_size=params.shard_size, limit=params.limit)
    ingest = ingest_shards(ingest_params)
    result = triplet_stages(params, ingest_params.out)
    counts = {"sources": result["num_sources"], "triplets": result["num_triplets"], "rejects": result["num_rejects"],
              "shards": len(result["shard_urls"])}
    publish_counts("build-triplets", f"Triplets from {params.source}", counts, result["rejects_by_reason"],
                   result["seconds"], inputs=result["num_sources"])
    rows = [{"stage": s, "seconds": round(t, 3), "samples/s": round(ingest["num_samples"] / t, 2) if t else None}
            for s, t in result["stage_seconds"].items()]
    create_table_artifact(key="build-triplets-stages", table=rows or [{"stage": "(none run)"}],
                          description="per-stage model time and throughput (one actor)")
    if result["preview_url"]:
        create_markdown_artifact(key="build-triplets-preview", markdown=_preview_markdown(result["preview_url"]),
                                 description="contact sheet: src | mask | fg | bg | depth fg | depth bg")
    get_run_logger().info("build-triplets: %s", counts)
    return {"ingest": ingest, "triplets": result}


def _preview_markdown(url: str) -> str:
    """Object-store previews are linked; local ones are named (the UI can't read local files)."""
    if url.startswith(("http://", "https://")):
        return f"![contact sheet]({url})"
    return f"Contact sheet (src | mask | fg | bg | depth fg | depth bg): `{url}`"
