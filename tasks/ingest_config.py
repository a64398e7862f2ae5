"""Ingest's config: the one owner of its defaults (the CLI options and the Prefect parameters read
them from here), kept free of heavy imports so ``cnc --help`` stays fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class IngestConfig:
    """Everything that determines the output bytes; stored in the output and compared on re-runs."""

    source_format: str
    source_url: str
    out_url: str
    size: int = 512
    shard_size: int = 256
    quality: int = 95
    min_side: int = 64
    limit: int | None = None
    source_options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("out_url")
        return d
