"""Prefect flow ``train-cnc``: the CnC stages as tasks, each one Ray Train job; a retry resumes.

Each stage task calls :func:`tasks.training.job.run_training`, which continues a crashed run from
its last checkpoint, so a task retry resumes instead of starting over, and a re-run of a finished
flow returns at once. Artifacts: the loss curve of each stage (PNG) and a table of the stages.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from tasks import storage
from tasks.training.config import CheckpointConfig, DataConfig, OptimConfig, ScalingSpec, TrainConfig

_T, _D, _O, _C, _S = TrainConfig(), DataConfig(), OptimConfig(), CheckpointConfig(), ScalingSpec()


class TrainParams(BaseModel):
    """Triplet shards -> trained CnC stages (defaults: the config tree's reference settings)."""

    stage: Literal["local", "global", "full", "all"] = Field("all", description="one stage, or the three in order")
    data: str = Field(..., description="triplet output of build-triplets (URL)")
    out: str = Field(..., description="output URL (with 'all': one folder per stage under it)")
    init: str = Field(_T.init, description="tiny, sd15 or a CnC pipeline folder to start from")
    init_weights: Optional[str] = Field(None, description="official CnC / Uni-ControlNet checkpoint for the fusers")
    workers: int = Field(_S.workers, ge=1, description="Ray Train workers")
    gpus_per_worker: float = Field(_S.gpus_per_worker, ge=0)
    cpus_per_worker: float = Field(_S.cpus_per_worker, gt=0)
    executor: Literal["ray", "local"] = Field(_S.executor, description="ray (Ray Train) or local (in the flow)")
    batch_size: int = Field(_T.batch_size, ge=1, description="global batch per optimizer step")
    grad_accum: int = Field(_T.grad_accum, ge=1)
    epochs: Optional[int] = Field(None, ge=1, description="epochs per stage (default 28 / 24 / 9)")
    max_steps: Optional[int] = Field(None, ge=1, description="stop each stage after this many steps")
    lr: float = Field(_O.lr, gt=0)
    val_fraction: float = Field(_D.val_fraction, ge=0, lt=1)
    checkpoint_every: int = Field(_C.every_n_steps, ge=1)
    mixed_precision: Literal["auto", "bf16", "no"] = Field(_T.mixed_precision)
    gradient_checkpointing: bool = False
    decode_cpus: float = Field(_D.decode_cpus, gt=0, description="CPUs per Ray Data decode task")
    seed: int = _T.seed


def base_config(params: TrainParams) -> TrainConfig:
    from flows.commands.train import build_config

    p = params.model_dump()
    stage, data, out = p.pop("stage"), p.pop("data"), p.pop("out")
    return build_config(stage, data, out, **p)


@task(name="train-stage", retries=1, retry_delay_seconds=5)
def train_stage(params: TrainParams, stage: str, out: str, init: str, init_weights: Optional[str]) -> dict[str, Any]:
    """One stage on Ray Train; a retry continues from the stage's last checkpoint."""
    from tasks.training.config import STAGE_EPOCHS
    from tasks.training.job import run_training

    cfg = dataclasses.replace(base_config(params), stage=stage, out=out, init=init, init_weights=init_weights,
                              epochs=params.epochs or STAGE_EPOCHS[stage])
    result = run_training(cfg)
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "report"} | {
        "samples": result.report.get("samples"), "history": result.report.get("history", [])}


@flow(name="train-cnc", log_prints=True)
def train_cnc(params: TrainParams) -> list[dict[str, Any]]:
    """Train the CnC stages from triplet shards; each ends in a pipeline folder `cnc generate` loads."""
    from tasks.training.job import STAGE_ORDER, check_chain

    stages = STAGE_ORDER if params.stage == "all" else (params.stage,)
    check_chain(base_config(params), stages)  # one clear error before any stage starts
    results: list[dict[str, Any]] = []
    init, init_weights = params.init, params.init_weights
    for stage in stages:
        out = storage.join(params.out, stage) if params.stage == "all" else params.out
        result = train_stage(params, stage, out, init, init_weights)
        results.append(result)
        init, init_weights = result["model_url"], None
        publish_loss_curve(result)
    rows = [{"stage": r["stage"], "steps": r["steps"], "final loss": r["final_loss"], "val loss": r["final_val_loss"],
             "seconds": r["seconds"], "samples/s": round(r["samples"] / r["seconds"], 2) if r["seconds"] else None,
             "model": r["model_url"], "skipped (already trained)": r["skipped"]} for r in results]
    create_table_artifact(key="train-cnc-stages", table=rows, description="CnC training stages")
    get_run_logger().info("train-cnc: %s", [(r["stage"], r["steps"], r["final_loss"]) for r in results])
    return results


def publish_loss_curve(result: dict[str, Any]) -> None:
    """The stage's loss curve as a markdown artifact with the PNG inline (and where it is stored)."""
    png = storage.read_bytes(result["loss_curve_url"])
    inline = base64.b64encode(png).decode()
    create_markdown_artifact(key=f"train-cnc-{result['stage']}-loss",
                             markdown=f"# {result['stage']} stage\n\n![loss curve](data:image/png;base64,{inline})\n\n"
                                      f"Stored at `{result['loss_curve_url']}`; model `{result['model_url']}`.",
                             description=f"loss curve of the {result['stage']} stage")
