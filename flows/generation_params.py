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
