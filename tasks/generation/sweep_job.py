"""GLoD sweeps (``cnc glod-sweep``): a sweep file -> image shards, a results table and figures.

The sweep's rows (:mod:`tasks.generation.sweep`) run as an image-shard job on the shard-job
runner, one image per group (each spec is its own UNet batch of prompts); every image's index
row carries its global and local alignment. The results table (``results.parquet``) joins the
grid point of each row with its scores or its reject reason; ``contact-<spec>.png`` shows each
spec's grid and ``alignment.png`` global vs local alignment with the Pareto front.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.generation.image_job import ImageShardJob, Parsed
from tasks.generation.sweep import Sweep, load_sweep
from tasks.generation.sweep_report import alignment_plot, contact_sheet, pareto_front
from tasks.manifest import versions
from tasks.shard_job import RunOptions, RunReport, Shard, run_shard_job
from tasks.shards import iter_tar_samples, read_index


@dataclass
class SweepResult:
    out_url: str
    rows: int
    images: int
    rejects: int
    rejects_by_reason: dict[str, int]
    results_url: str
    figure_urls: list[str] = field(default_factory=list)
    seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0

    def summary(self) -> str:
        return (f"{self.rows} rows -> {self.images} images, {self.rejects} rejects "
                f"({self.shards_written} shards written, {self.shards_skipped} skipped); results {self.results_url}")


class SweepJob(ImageShardJob):
    kind = "glod-sweep"
    unit = "img"
    worker_kind = "glod"
    extra_columns = {"global_score": pa.float64(), "local_score": pa.float64()}

    def __init__(self, sweep: Sweep, sweep_file: str, out_url: str, clip: str, shard_size: int, actors: int,
                 gpus_per_actor: float, device: str) -> None:
        self.sweep, self.sweep_file, self.clip, self.shard_size, self.device = sweep, sweep_file, clip, shard_size, device
        self._out_url = out_url
        self.actors, self.gpus_per_actor = actors, gpus_per_actor

    @property
    def out_url(self) -> str:  # type: ignore[override]
        return self._out_url

    def identity(self) -> dict[str, Any]:
        return {"sweep_file": self.sweep_file, "model": self.sweep.model, "steps": self.sweep.steps,
                "clip": self.clip, "shard_size": self.shard_size}

    def plan(self) -> list[Shard]:
        rows = [{**r.to_json(), "reason": r.reason, "message": r.message} for r in self.sweep.rows]
        return [self.shard(n, rows[i:i + self.shard_size], len(rows[i:i + self.shard_size]))
                for n, i in enumerate(range(0, len(rows), self.shard_size))]

    def parse(self, shard: Shard) -> Parsed:
        rows, rejects = [], []
        for r in shard.inputs:
            if r["reason"]:
                rejects.append((r["id"], r["reason"], r["message"]))
            else:
                rows.append({k: r[k] for k in ("id", "spec_name", "point", "seed", "spec")})
        return rows, rejects

    def groups(self, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return [[row] for row in rows]

    def worker_kwargs(self) -> dict[str, Any]:
        return {"model": self.sweep.model, "clip": self.clip, "steps": self.sweep.steps, "device": self.device}

    def sample_json(self, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        return {**row, "prompt": row["spec"]["global_prompts"][0]["text"], "global_score": result["global_score"],
                "local_score": result["local_score"]}

    def index_extra(self, row: dict[str, Any] | None, result: dict[str, Any] | None) -> dict[str, Any]:
        if not result:
            return {"global_score": None, "local_score": None}
        return {"global_score": result.get("global_score"), "local_score": result.get("local_score")}

    def finalize(self, report: RunReport) -> SweepResult:
        by_id = {r.id: r for r in self.sweep.rows}
        results, images = [], {}
        for shard in report.committed:
            for entry in read_index(shard.index_url).to_pylist():
                row = by_id[entry["source_id"]]
                results.append({"id": row.id, "spec_name": row.spec_name, "point": row.point, "seed": row.seed,
                                "status": entry["status"], "reason": entry["reason"],
                                "global_score": _num(entry.get("global_score")),
                                "local_score": _num(entry.get("local_score")), "shard": shard.index})
        results.sort(key=lambda r: r["id"])
        front = set(pareto_front([(r["global_score"], r["local_score"]) for r in results]))
        table = [{**{k: v for k, v in r.items() if k != "point"}, "point": json.dumps(r["point"], sort_keys=True),
                  **{f"grid_{a}": json.dumps(r["point"].get(a)) for a in self.sweep.axes}, "pareto": i in front}
                 for i, r in enumerate(results)]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(table), buffer, compression="zstd")
        results_url = storage.join(self.out_url, "results.parquet")
        storage.write_bytes(results_url, buffer.getvalue())
        figures = []
        rows_axis, cols_axis = self.sweep.contact_rows, self.sweep.contact_columns
        first_of_cell: dict[tuple, str] = {}
        for r in results:  # a contact sheet shows one image per cell: read only those, in one pass
            if r["status"] == "ok":
                first_of_cell.setdefault((r["spec_name"], _key(r["point"][rows_axis]), _key(r["point"][cols_axis])),
                                         r["id"])
        wanted = set(first_of_cell.values())
        images = {s["__key__"]: s["png"] for shard in report.committed for s in iter_tar_samples(shard.tar_url)
                  if s["__key__"] in wanted}
        for name in self.sweep.spec_names:
            spec_rows = [r for r in results if r["spec_name"] == name]
            figures.append(_write_png(storage.join(self.out_url, f"contact-{name}.png"),
                                      contact_sheet(spec_rows, images, rows_axis, cols_axis)))
        figures.append(_write_png(storage.join(self.out_url, "alignment.png"), alignment_plot(results)))
        reasons = report.reasons
        report.write_manifest({
            "kind": "cnc-glod-sweep",
            "counts": {"rows": report.inputs, "images": report.samples, "rejects": len(report.rejects),
                       "rejects_by_reason": dict(sorted(reasons.items()))},
            "config": self.identity(), "axes": self.sweep.axes, "versions": versions(),
            "results": "results.parquet", "figures": [u.rsplit("/", 1)[-1] for u in figures],
        })
        return SweepResult(self.out_url, report.inputs, report.samples, len(report.rejects), reasons, results_url,
                           figures, shards_written=len(report.written),
                           shards_skipped=len(report.shards) - len(report.written) - len(report.failed))


def run_sweep(sweep_file: str | Path, out_url: str, *, clip: str = "tiny", shard_size: int = 16, actors: int = 1,
              gpus_per_actor: float = 0.0, device: str = "cpu", executor: str = "ray", resume: bool = False,
              progress: bool = False, run_options: RunOptions | None = None) -> SweepResult:
    """Render and score every row of a sweep file (SweepError for a malformed file)."""
    t0 = time.perf_counter()
    sweep = load_sweep(sweep_file)
    storage.check_writable(out_url)
    job = SweepJob(sweep, str(Path(sweep_file).resolve()), out_url.rstrip("/"), clip, shard_size, actors,
                   gpus_per_actor, device)
    opts = replace(run_options or RunOptions(), executor=executor, resume=resume, progress=progress)
    result = run_shard_job(job, opts)
    result.seconds = time.perf_counter() - t0
    return result


def _write_png(url: str, image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(url, buffer.getvalue())
    return url


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _num(value: Any) -> float:
    return float(value) if value is not None else float("nan")
