"""Typed parameters of the retraining flow (``retrain-cnc``) and ``cnc retrain``: no Prefect import."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, model_validator

from tasks.training.config import CheckpointConfig, DataConfig, OptimConfig, ScalingSpec, TrainConfig

_T, _D, _O, _C, _S = TrainConfig(), DataConfig(), OptimConfig(), CheckpointConfig(), ScalingSpec()
TRAINING_FIELDS = ("stage", "epochs", "max_steps", "batch_size", "lr", "val_fraction", "mixed_precision", "seed",
                   "checkpoint_every")
"""The parameters that change a candidate's weights: part of its identity (its folder's name)."""


class RetrainParams(BaseModel):
    """New triplets -> a candidate fine-tuned from the champion -> promoted only when better."""

    data: str = Field(..., description="triplet data: a build-triplets --out or its triplets/ folder (URL)")
    registry: str = Field(..., description="model registry URL (docs/registry.md)")
    work: str = Field(..., description="URL for candidates and frozen evaluation sets")
    eval_triplets: str = Field(..., description="held-out triplet set (never trained on): the frozen evaluation rows")
    stage: Literal["full", "all"] = Field("full", description="fine-tune the full stage, or all three in order")
    init: str = Field(_T.init, description="start model when the registry has no champion (tiny, sd15, a folder)")
    force: bool = Field(False, description="retrain even when the data is what the champion saw")
    metric: str = Field("both.fid", description="<setting>.<metric> that decides, e.g. both.fid, depth.clip_score")
    margin: float = Field(0.0, ge=0, description="the candidate must beat the champion by more than this")
    relative: bool = Field(False, description="margin as a fraction of the champion's value")
    higher_is_better: Optional[bool] = Field(None, description="direction of metric (default: from its name)")
    # training (train-cnc's parameters)
    epochs: Optional[int] = Field(1, ge=1, description="epochs per stage (None: the paper's 28 / 24 / 9)")
    max_steps: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(_T.batch_size, ge=1)
    lr: float = Field(_O.lr, gt=0)
    val_fraction: float = Field(_D.val_fraction, ge=0, lt=1)
    checkpoint_every: int = Field(_C.every_n_steps, ge=1)
    mixed_precision: Literal["auto", "bf16", "no"] = Field(_T.mixed_precision)
    seed: int = _T.seed
    workers: int = Field(_S.workers, ge=1)
    gpus_per_worker: float = Field(_S.gpus_per_worker, ge=0)
    cpus_per_worker: float = Field(_S.cpus_per_worker, gt=0)
    decode_cpus: float = Field(_D.decode_cpus, gt=0)
    executor: Literal["ray", "local"] = Field(_S.executor, description="training: Ray Train or this process")
    # the frozen evaluation set
    eval_settings: list[Literal["depth", "exemplar", "both"]] = Field(["depth", "exemplar", "both"])
    eval_rows: Optional[int] = Field(None, ge=2, description="first N held-out triplets (default: all)")
    eval_steps: int = Field(50, ge=1, description="sampler steps of the generated images")
    eval_guidance: float = Field(7.0, ge=0)
    eval_seed: int = 0
    preset: Literal["tiny", "sd15"] = Field("sd15", description="feature nets; tiny measures plumbing only")
    inception_weights: Optional[str] = Field(None, description="FID Inception weights (required unless tiny)")
    clip: Optional[str] = None
    splits: int = Field(10, ge=1)
    # generation and evaluation resources
    generate_executor: Literal["ray", "local"] = "ray"
    generate_batch_size: int = Field(4, ge=1)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    device: Optional[str] = None
    eval_batch_size: int = Field(16, ge=1)
    eval_executor: Literal["ray", "local"] = Field("ray", description="evaluation: actor pool or this process")

    @model_validator(mode="after")
    def _check(self) -> RetrainParams:
        from tasks.retraining.eval_set import check_metric

        check_metric(self.metric, tuple(self.eval_settings))
        if self.preset != "tiny" and not self.inception_weights:
            raise ValueError(f"inception_weights is required with preset {self.preset}")
        return self

    def training(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TRAINING_FIELDS}
