"""Batch generation (``cnc generate-batch``): a job table -> image shards, exactly once, resumable.

The table (parquet or JSONL, any fsspec URL) is cut into shards of ``shard_size`` rows; each shard
becomes ``shards/shard-NNNNNN.tar`` (``<id>.png`` + ``<id>.json``, the row) with its index, and
``rejects.parquet`` lists every row without an image and why. Rows of a shard with the same
settings go through the UNet ``batch_size`` at a time, each with its own seeded generator. The
groups are fixed by the plan, so the same table and config write the same bytes on any executor;
a rerun skips committed shards and a crash redoes only the missing ones (:mod:`tasks.shard_job`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tasks import storage
from tasks.generation.image_job import ImageShardJob, Parsed
from tasks.generation.rows import GenerationRow, RowError, parse_row, settings_key
from tasks.generation.table import read_rows
from tasks.manifest import versions
from tasks.shard_job import RunOptions, RunReport, Shard, run_shard_job


@dataclass(frozen=True)
class GenerationConfig:
    rows_url: str
    out_url: str
    model: str = "tiny"
    condition_root: str | None = None
    shard_size: int = 64
    batch_size: int = 4
    actors: int = 1
    gpus_per_actor: float = 0.0
    device: str | None = None
    cpus_per_actor: float = 1.0

    def identity(self) -> dict[str, Any]:
        """What decides the bytes (the batch size too: a batched UNet may round differently)."""
        return {"rows_url": self.rows_url, "model": self.model, "condition_root": self.condition_root,
                "shard_size": self.shard_size, "batch_size": self.batch_size}


@dataclass
class GenerationResult:
    out_url: str
    rows: int
    images: int
    rejects: int
    rejects_by_reason: dict[str, int]
    shard_urls: list[str]
    seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejects_by_reason.items()))
        return (f"{self.rows} rows -> {self.images} images, {self.rejects} rejects{f' ({reasons})' if reasons else ''} "
                f"in {len(self.shard_urls)} shards ({self.shards_written} written, {self.shards_skipped} skipped) "
                f"at {self.out_url}; {self.seconds:.1f}s, {rate:.2f} images/s")


class GenerationJob(ImageShardJob):
    kind = "generate-batch"
    unit = "img"
    worker_kind = "cnc"

    def __init__(self, cfg: GenerationConfig) -> None:
        self.cfg = cfg
        self.actors, self.gpus_per_actor, self.cpus_per_actor = cfg.actors, cfg.gpus_per_actor, cfg.cpus_per_actor

    @property
    def out_url(self) -> str:  # type: ignore[override]
        return self.cfg.out_url

    def identity(self) -> dict[str, Any]:
        return self.cfg.identity()

    def in_process_only(self) -> bool:
        urls = (self.cfg.out_url, self.cfg.rows_url, self.cfg.condition_root or "")
        return any(u.startswith("memory://") for u in urls)

    def plan(self) -> list[Shard]:
        shards, chunk, seen = [], [], set()
        for source_id, raw, error in read_rows(self.cfg.rows_url):
            if raw is not None and source_id in seen:
                raw, error = None, f"id {source_id!r} appears more than once in the table"
            elif raw is not None:
                seen.add(source_id)
            chunk.append({"source_id": source_id, "raw": raw, "error": error})
            if len(chunk) == self.cfg.shard_size:
                shards.append(self.shard(len(shards), chunk, len(chunk)))
                chunk = []
        if chunk:
            shards.append(self.shard(len(shards), chunk, len(chunk)))
        return shards

    def parse(self, shard: Shard) -> Parsed:
        rows, rejects = [], []
        for entry in shard.inputs:
            if entry["raw"] is None:
                reason = "duplicate_id" if "more than once" in entry["error"] else "bad_json"
                rejects.append((entry["source_id"], reason, entry["error"]))
                continue
            try:
                rows.append(parse_row(entry["raw"]).to_json())
            except RowError as exc:
                rejects.append((entry["source_id"], exc.reason, str(exc)))
        return rows, rejects

    def groups(self, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        by_key: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            by_key.setdefault(settings_key(GenerationRow(**row)), []).append(row)
        size = self.cfg.batch_size
        return [members[i:i + size] for members in by_key.values() for i in range(0, len(members), size)]

    def worker_kwargs(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "device": self.cfg.device, "batch_size": self.cfg.batch_size,
                "condition_root": self.cfg.condition_root, "torch_threads": None}

    def finalize(self, report: RunReport) -> GenerationResult:
        reasons = report.reasons
        report.write_manifest({
            "kind": "cnc-generate-batch",
            "counts": {"rows": report.inputs, "images": report.samples, "rejects": len(report.rejects),
                       "rejects_by_reason": dict(sorted(reasons.items()))},
            "config": asdict(self.cfg),
            "versions": versions(),
            "files": {"png": "image", "json": "the job row"},
        })
        return GenerationResult(self.cfg.out_url, report.inputs, report.samples, len(report.rejects), reasons,
                                [s.tar_url for s in report.committed], shards_written=len(report.written),
                                shards_skipped=len(report.shards) - len(report.written) - len(report.failed))


def run_generation(cfg: GenerationConfig, *, executor: str = "ray", resume: bool = False, progress: bool = False,
                   run_options: RunOptions | None = None) -> GenerationResult:
    """Generate every row of the table into image shards (see the module docstring)."""
    t0 = time.perf_counter()
    if cfg.shard_size < 1 or cfg.batch_size < 1 or cfg.actors < 1:
        raise ValueError("shard_size, batch_size and actors must be at least 1")
    if executor == "ray" and any(u.startswith("memory://") for u in (cfg.rows_url, cfg.out_url)):
        raise ValueError("memory:// lives inside one process; Ray workers cannot see it (use executor='local')")
    storage.check_writable(cfg.out_url)
    opts = replace(run_options or RunOptions(), executor=executor, resume=resume, progress=progress)
    result = run_shard_job(GenerationJob(cfg), opts)
    result.seconds = time.perf_counter() - t0
    return result
