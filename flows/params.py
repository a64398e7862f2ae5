"""Typed flow parameters: Prefect renders them as forms in the UI and validates them on submit."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from tasks.ingest_config import IngestConfig
from tasks.run_options import RunOptions
from tasks.triplets.config import INPAINT_STEPS, StageOptions, TripletsConfig

SourceFormat = Literal["folder", "coco-stuff", "pickapic", "webdataset"]
Executor = Literal["auto", "ray", "processes", "local"]
EXECUTOR_HELP = ("auto: Ray with RAY_ADDRESS (or GPU stages), else a pool of worker processes on this machine; "
                 "ray, processes or local (this process) to choose")


class IngestParams(BaseModel):
    """Where the source images are and how to shard them."""

    source_format: SourceFormat = Field("folder", description="layout of the source")
    source: str = Field(..., description="source URL: a path, file://, s3://, memory://")
    out: str = Field(..., description="output URL of the ingested shards")
    size: int = Field(IngestConfig.size, ge=8, le=4096, description="side of the square centre crop, in pixels")
    shard_size: int = Field(IngestConfig.shard_size, ge=1, description="inputs per shard")
    quality: int = Field(IngestConfig.quality, ge=50, le=100, description="JPEG quality of the crops")
    limit: Optional[int] = Field(None, ge=1, description="only the first N inputs (for trials)")
    extend: bool = Field(False, description="append the source's new inputs to a finished output as new shards")
    executor: Executor = Field(RunOptions.executor, description=EXECUTOR_HELP)


class StageParams(BaseModel):
    """Resources of one model stage's Ray actor pool."""

    batch_size: int = Field(StageOptions.batch_size, ge=1, description="samples per model call")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per actor (default: a small share; "
                                      "inpainting shares what the other stages leave)")
    num_gpus: float = Field(StageOptions.num_gpus, ge=0, description="GPUs per actor; fractions share a GPU")
    min_actors: Optional[int] = Field(None, ge=1, description="actors started before the first batch (default 1; "
                                      "inpainting on CPUs: ~80% of the CPUs' count)")
    max_actors: Optional[int] = Field(None, ge=1, description="largest size of the pool (default: min_actors; "
                                      "a GPU stage: as many as the GPUs hold)")
    memory_gib: Optional[float] = Field(None, gt=0, description="memory Ray reserves per actor, GiB (a "
                                        "scheduling hint; sd15 inpainting weights alone are ~4.3 GiB in fp32)")


class BuildTripletsParams(BaseModel):
    """Source images -> CnC triplets: ingest, then saliency, inpainting and depth on Ray."""

    source_format: SourceFormat = Field("folder", description="layout of the source")
    source: str = Field(..., description="source URL: a path, file://, s3://")
    out: str = Field(..., description="output URL; ingest/ and triplets/ are written under it")
    preset: Literal["tiny", "sd15"] = Field(TripletsConfig.preset, description="model preset")
    size: int = Field(IngestConfig.size, ge=8, le=4096, description="side of the square crops")
    shard_size: int = Field(IngestConfig.shard_size, ge=1, description="inputs per shard")
    limit: Optional[int] = Field(None, ge=1, description="only the first N inputs")
    extend: bool = Field(False, description="append the source's new inputs to a finished output as new shards "
                         "(ingest and triplets); emits cnc.triplets.committed when new shards are committed")
    inpaint_steps: int = Field(INPAINT_STEPS, ge=1, le=200, description="denoising steps of the inpainting")
    clip: bool = Field(TripletsConfig.clip, description="also store CLIP image embeddings of fg and bg")
    latents: bool = Field(TripletsConfig.latents, description="also store VAE latents of the source crop (fast "
                          "training)")
    stages: dict[str, StageParams] = Field(default_factory=dict,
                                           description="per-stage resources, e.g. {'inpaint': {'num_gpus': 1}}")
    executor: Executor = Field(RunOptions.executor, description=EXECUTOR_HELP)
