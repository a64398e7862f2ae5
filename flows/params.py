"""Typed flow parameters: Prefect renders them as forms in the UI and validates them on submit."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

SourceFormat = Literal["folder", "coco-stuff", "pickapic", "webdataset"]


class IngestParams(BaseModel):
    """Where the source images are and how to shard them."""

    source_format: SourceFormat = Field("folder", description="layout of the source")
    source: str = Field(..., description="source URL: a path, file://, s3://, memory://")
    out: str = Field(..., description="output URL of the ingested shards")
    size: int = Field(512, ge=8, le=4096, description="side of the square centre crop, in pixels")
    shard_size: int = Field(256, ge=1, description="inputs per shard")
    quality: int = Field(95, ge=50, le=100, description="JPEG quality of the crops")
    limit: Optional[int] = Field(None, ge=1, description="only the first N inputs (for trials)")
