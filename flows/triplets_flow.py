"""Prefect flow ``build-triplets``: ingest, then the model stages.

Locally (and wherever ``CNC_RAY_JOBS_ADDRESS`` is unset) the two jobs run from this process, on
the Ray at ``RAY_ADDRESS`` or, without it, on a pool of worker processes (``executor``). With
``CNC_RAY_JOBS_ADDRESS`` set to a cluster's dashboard (``http://head:8265``), both run as one job
submitted through the Ray Jobs API: a dropped connection no longer ends the job, a re-run of the
flow follows the job it started, and a cancelled flow run stops it (``tasks.ray_jobs``).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.artifacts import publish_counts
from flows.ingest_flow import ingest_shards
from flows.params import BuildTripletsParams, IngestParams
from tasks import storage

if TYPE_CHECKING:
    from tasks.ray_jobs import JobSpec

# emitted after a run that committed new triplet shards; the retraining deployment triggers on it
COMMITTED_EVENT = "cnc.triplets.committed"


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
                          latents=params.latents, stages=triplet_stage_options(params), resume=True,
                          extend=params.extend, executor=params.executor)
    return asdict(result)


def cluster_job_spec(params: BuildTripletsParams, run_id: str, python: str = "python") -> JobSpec:
    """The Ray Jobs API submission of the whole build (ingest + stages) for one flow run."""
    from tasks.ray_jobs import JobSpec
    from tasks.redact import redact_url
    from tasks.triplets.cluster_entry import job_spec

    for name in ("source", "out"):
        url = getattr(params, name)
        if redact_url(url) != url:
            raise ValueError(f"{name} carries credentials in its URL; on a cluster they come from the "
                             "nodes' role or secret (the entrypoint is visible on the Ray dashboard)")
    ingest = {"source_format": params.source_format, "source": params.source,
              "out": storage.join(params.out, "ingest"), "size": params.size, "shard_size": params.shard_size,
              "limit": params.limit}
    triplets = {"out": storage.join(params.out, "triplets"), "preset": params.preset, "clip": params.clip,
                "latents": params.latents, "stages": {k: asdict(v) for k, v in triplet_stage_options(params).items()}}
    if params.extend:
        ingest["extend"] = triplets["extend"] = True
    entrypoint = shlex.join([python, "-m", "tasks.triplets.cluster_entry", job_spec(ingest, triplets)])
    return JobSpec(entrypoint=entrypoint, key=run_id, name="build-triplets",
                   metadata={"prefect_flow_run_id": run_id, "flow": "build-triplets", "out": params.out})


@task(name="cluster-job", retries=2, retry_delay_seconds=30)
def cluster_job(params: BuildTripletsParams, address: str) -> dict[str, Any]:
    """The build as one Ray job on the cluster: submitted once per flow run, followed, its log streamed
    here; a retry or a re-run of the flow finds the job by its submission id."""
    from tasks.ray_jobs import run_job
    from tasks.triplets.cluster_entry import RESULT_PREFIX, parse_result

    logger = get_run_logger()
    run_id = flow_run.get_id() or "no-flow-run"
    python = os.environ.get("CNC_RAY_JOB_PYTHON", "python")  # the interpreter on the cluster's PATH by default
    outcome = run_job(cluster_job_spec(params, run_id, python), address,
                      on_line=lambda line: logger.info("%s", line), capture=RESULT_PREFIX)
    logger.info("Ray job %s %s (%s)", outcome.submission_id, outcome.status,
                "followed from an earlier run" if outcome.attached else "submitted by this run")
    return parse_result(outcome.lines)


def _stop_cluster_job(flow, run, state) -> None:
    """on_cancellation: stop this flow run's Ray job (every attempt), if it went through the Jobs API.

    A crash is not a cancellation: the job keeps running and a retry of the run follows it."""
    from tasks.ray_jobs import JobSpec, client, jobs_address, stop, submission_id

    address = jobs_address()
    if not address:
        return
    jobs, key = client(address), str(run.id)
    attempt = 1
    while True:
        sid = submission_id(JobSpec(entrypoint="", key=key, name="build-triplets"), attempt)
        try:
            jobs.get_job_status(sid)
        except RuntimeError:
            break
        stop(jobs, sid)
        attempt += 1


@flow(name="build-triplets", log_prints=True, on_cancellation=[_stop_cluster_job])
def build_triplets(params: BuildTripletsParams) -> dict[str, Any]:
    """Build CnC training triplets {I_f, I_b, M} with depth maps from a source of images."""
    from tasks.ray_jobs import jobs_address
    from tasks.redact import install_log_redaction

    install_log_redaction()
    address = jobs_address()
    if address:
        both = cluster_job(params, address)
        ingest, result = both["ingest"], both["triplets"]
    else:
        ingest_params = IngestParams(source_format=params.source_format, source=params.source,
                                     out=storage.join(params.out, "ingest"), size=params.size,
                                     shard_size=params.shard_size, limit=params.limit, extend=params.extend,
                                     executor=params.executor)
        ingest = ingest_shards(ingest_params)
        result = triplet_stages(params, ingest_params.out)
    counts = {"sources": result["num_sources"], "triplets": result["num_triplets"], "rejects": result["num_rejects"],
              "shards": len(result["shard_urls"]), "sources this run": result["num_inputs_run"]}
    publish_counts("build-triplets", f"Triplets from {params.source}", counts, result["rejects_by_reason"],
                   result["seconds"], inputs=result["num_inputs_run"])
    # the stage seconds cover this run's samples only (a resumed run skips what is staged or final)
    rows = [{"stage": s, "seconds": round(t, 3), "samples/s": round(result["num_computed"] / t, 2) if t else None}
            for s, t in result["stage_seconds"].items()]
    create_table_artifact(key="build-triplets-stages", table=rows or [{"stage": "(none run)"}],
                          description="per-stage model time and throughput (one actor)")
    if result["preview_url"]:
        create_markdown_artifact(key="build-triplets-preview", markdown=_preview_markdown(result["preview_url"]),
                                 description="contact sheet: src | mask | fg | bg | depth fg | depth bg")
    get_run_logger().info("build-triplets: %s", counts)
    if result.get("shards_written"):
        emit_committed(result)
    return {"ingest": ingest, "triplets": result}


def committed_event(result: dict[str, Any]) -> dict[str, Any]:
    """The event a run that committed new triplet shards emits (the retraining deployment's
    trigger): its resource names the output (URL redacted), its payload the counts and the hash of
    the manifest that lists the new shards."""
    from tasks.redact import redact_url

    out = redact_url(result["out_url"])
    return {
        "event": COMMITTED_EVENT,
        "resource": {"prefect.resource.id": f"cnc.triplets.{out}", "prefect.resource.name": out},
        "payload": {"out": out, "manifest_sha256": result["manifest_sha256"],
                    "shards_written": result["shards_written"], "shards": len(result["shard_urls"]),
                    "sources": result["num_sources"], "triplets": result["num_triplets"],
                    "rejects": result["num_rejects"]},
    }


def emit_committed(result: dict[str, Any]) -> None:
    """Emit :data:`COMMITTED_EVENT` for a run that committed new shards."""
    from prefect.events import emit_event

    emit_event(**committed_event(result))


def _preview_markdown(url: str) -> str:
    """Object-store previews are linked; local ones are named (the UI can't read local files).
    A URL with credentials (a presigned one) is shown redacted, never stored whole."""
    from tasks.redact import redact_url

    url = redact_url(url)
    if url.startswith(("http://", "https://")):
        return f"![contact sheet]({url})"
    return f"Contact sheet (src | mask | fg | bg | depth fg | depth bg): `{url}`"
