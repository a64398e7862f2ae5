"""Typed parameters of the generation and evaluation flows (generate-batch, evaluate-cnc, glod-sweep)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class EvaluateParams(BaseModel):
    """Generated sets (one per setting) against real images: FID, Inception Score, CLIPScore."""

    real: str = Field(..., description="shard set URL of the real (held-out) images")
    settings: dict[str, str] = Field(..., description="setting name -> generated shard set URL, "
                                     "e.g. {'depth': ..., 'exemplar': ..., 'both': ...}")
    out: str = Field(..., description="output URL: metrics.json, metrics.png, per-shard statistics")
    preset: Literal["tiny", "sd15"] = Field("sd15", description="tiny measures plumbing only")
    inception_weights: Optional[str] = Field(None, description="local path of the FID Inception weights "
                                             "(required unless preset is tiny)")
    clip: Optional[str] = Field(None, description="CLIP model id or folder (default: the preset's)")
    actors: int = Field(1, ge=1, description="feature-extraction actors")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor")
    device: str = Field("cpu", description="torch device of the feature nets (cuda with GPU actors)")
    batch_size: int = Field(16, ge=1, description="images per feature-net call")
    splits: int = Field(10, ge=1, description="Inception Score splits")
    condition_root: Optional[str] = Field(None, description="the generation's condition root: also measure "
                                          "condition fidelity (depth error, exemplar similarity)")
    depth: Optional[str] = Field(None, description="depth model for condition fidelity (default: the preset's)")
    executor: Literal["ray", "local"] = Field("ray", description="ray (actor pool) or local (this process)")


class GenerateBatchParams(BaseModel):
    """A job table -> image shards with CnC on a Ray actor pool."""

    rows: str = Field(..., description="job table URL (.parquet or .jsonl)")
    out: str = Field(..., description="output URL of the image shards")
    model: str = Field("tiny", description="'tiny' or a saved CnC pipeline folder")
    condition_root: Optional[str] = Field(None, description="URL the rows' condition paths are relative to")
    shard_size: int = Field(64, ge=1, description="rows per shard")
    batch_size: int = Field(4, ge=1, description="rows with the same settings per UNet batch")
    actors: int = Field(1, ge=1, description="generation actors")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor")
    device: Optional[str] = Field(None, description="torch device of the actors (cuda with GPU actors)")
    executor: Literal["ray", "local"] = Field("ray", description="ray (actor pool) or local (this process)")


class GLoDSweepParams(BaseModel):
    """A GLoD sweep file -> scored images, a results table, contact sheets and the alignment plot."""

    sweep: str = Field(..., description="path of the sweep YAML (its spec files beside it)")
    out: str = Field(..., description="output URL")
    clip: str = Field("tiny", description="CLIP for the alignment scores: tiny, or a model id / folder")
    shard_size: int = Field(16, ge=1, description="images per shard")
    actors: int = Field(1, ge=1, description="rendering actors")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor")
    device: str = Field("cpu", description="torch device of the actors")
