"""The ingest stage: source images -> WebDataset shards of centre crops, on Ray Data.

Plan: list the source into refs (no bytes), assign them to shards deterministically (consecutive
runs of ``shard_size`` refs in listing order). Run: one Ray Data task per pending shard streams its
items through :func:`tasks.imaging.prepare_image` into a :class:`tasks.shards.ShardWriter`.
A shard is published atomically, so a killed worker or node only costs a retry of that shard, and
a re-run skips every committed shard. Finish: gather the shard indexes into ``rejects.parquet`` and
``manifest.json``. Every input ends as exactly one index row: a sample or a reject with a reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.manifest import versions
from tasks.shards import ShardWriter, read_index, shard_urls
from tasks.sources import get_source
from tasks.sources.base import Source, SourceItem

log = logging.getLogger(__name__)

DUPLICATE = "duplicate_source_id"
MAX_CAPTION_CHARS = 4096


def sample_key(source_id: str) -> str:
    """A stable, filename-safe WebDataset key for a source id."""
    return hashlib.sha1(source_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]


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


@dataclass
class IngestResult:
    out_url: str
    num_inputs: int
    num_samples: int
    num_rejects: int
    rejects_by_reason: dict[str, int]
    shard_urls: list[str]
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.num_inputs / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.num_inputs} inputs -> {self.num_samples} samples + {self.num_rejects} rejects in "
                f"{len(self.shard_urls)} shards ({self.shards_written} written, {self.shards_skipped} already done) "
                f"at {self.out_url}")


class OutputConflict(RuntimeError):
    """The output already holds a different run, or an unfinished one and no --resume."""


# ---------------------------------------------------------------------------------------- plan


@dataclass
class ShardPlan:
    """Shard ``index`` loads ``load`` and rejects ``duplicates`` (refs listed earlier in the source)."""

    index: int
    load: list[str]
    duplicates: list[str]

    @property
    def size(self) -> int:
        return len(self.load) + len(self.duplicates)


def plan_shards(source: Source, shard_size: int, limit: int | None = None) -> list[ShardPlan]:
    """Consecutive runs of ``shard_size`` refs in listing order. A ref listed again is kept in the
    plan as a duplicate (it becomes a reject), so the count of inputs is the count of listed refs."""
    plans: list[ShardPlan] = []
    seen: set[str] = set()
    for n, ref in enumerate(source.list_refs()):
        if limit is not None and n >= limit:
            break
        if not plans or plans[-1].size == shard_size:
            plans.append(ShardPlan(len(plans), [], []))
        (plans[-1].duplicates if ref in seen else plans[-1].load).append(ref)
        seen.add(ref)
    return plans


# --------------------------------------------------------------------------- one shard, on Ray


def process_shard(cfg: IngestConfig, plan: ShardPlan) -> dict[str, Any]:
    """Write shard ``index`` (or skip it if committed). Never raises for a bad input."""
    from tasks.imaging import RejectError, prepare_image, prepare_label_map

    tar_url, index_url = shard_urls(storage.join(cfg.out_url, "shards"), plan.index)
    if storage.exists(index_url):
        return {"shard": plan.index, "skipped": True, **_counts_of(index_url)}
    t0 = time.perf_counter()
    source = get_source(cfg.source_format, cfg.source_url, **cfg.source_options)
    with ShardWriter(tar_url, index_url) as writer:
        for item in _load_accounted(source, plan.load):
            key = sample_key(item.source_id)
            if item.error:
                writer.add_reject(item.source_id, item.error, key)
                continue
            try:
                if not item.image:
                    raise RejectError("empty_file", "the image has no bytes")
                prepared = prepare_image(item.image, cfg.size, min_side=cfg.min_side, quality=cfg.quality)
                files = {"jpg": prepared.jpeg}
                meta: dict[str, Any] = {"source_id": item.source_id, "orig_width": prepared.orig_width,
                                        "orig_height": prepared.orig_height, "crop_box": list(prepared.crop_box),
                                        "flags": list(prepared.flags), **item.meta}
                if item.label_map is not None:
                    files["mask.png"] = prepare_label_map(item.label_map, prepared)
                caption = item.caption
                if caption is not None:
                    if len(caption) > MAX_CAPTION_CHARS:
                        caption = caption[:MAX_CAPTION_CHARS]
                        meta["caption_truncated"] = True
                    files["txt"] = caption.encode("utf-8")
                files["json"] = json.dumps(meta, sort_keys=True, default=str).encode()
            except RejectError as exc:
                writer.add_reject(item.source_id, exc.reason, key)
                continue
            except Exception as exc:  # noqa: BLE001 - one input never kills the run
                writer.add_reject(item.source_id, f"unexpected_error: {type(exc).__name__}: {exc}"[:200], key)
                continue
            writer.add_sample(key, item.source_id, files, caption)
        for ref in plan.duplicates:
            writer.add_reject(ref, DUPLICATE, sample_key(ref))
        counts = writer.commit()
    return {"shard": plan.index, "skipped": False, "seconds": time.perf_counter() - t0, **counts}


def _load_accounted(source: Source, refs: list[str]) -> Iterator[SourceItem]:
    """``source.load`` with the one-item-per-ref promise enforced: a reader that fails mid-way
    turns the rest of its refs into rejects instead of losing them."""
    done = 0
    try:
        for item in source.load(refs):
            if done >= len(refs):
                break
            if item.source_id != refs[done]:
                item = SourceItem(refs[done], error=f"reader_order_error: got {item.source_id!r}")
            done += 1
            yield item
    except Exception as exc:  # noqa: BLE001
        reason = f"source_read_error: {type(exc).__name__}: {exc}"[:200]
        for ref in refs[done:]:
            yield SourceItem(ref, error=reason)
        return
    for ref in refs[done:]:
        yield SourceItem(ref, error="reader_returned_nothing")


def _counts_of(index_url: str) -> dict[str, int]:
    status = read_index(index_url).column("status").to_pylist()
    ok = sum(1 for s in status if s == "ok")
    return {"samples": ok, "rejects": len(status) - ok}


# ------------------------------------------------------------------------------------- driver


def run_ingest(source_format: str, source_url: str, out_url: str, *, size: int = 512, shard_size: int = 256,
               quality: int = 95, min_side: int = 64, resume: bool = False, limit: int | None = None,
               progress: bool = False, on_shard: Callable[[dict[str, Any]], None] | None = None,
               executor: str = "ray", **source_options: Any) -> IngestResult:
    """Shard a source into WebDataset tars. See the module docstring.

    ``executor="ray"`` runs one Ray Data task per shard (local Ray, or the cluster at
    ``RAY_ADDRESS``); ``"local"`` runs the shards one after another in this process (debugging,
    ``memory://`` URLs, baselines).
    """
    cfg = IngestConfig(source_format, source_url, out_url.rstrip("/"), size, shard_size, quality, min_side, limit,
                       dict(source_options))
    t0 = time.perf_counter()
    source = validate_inputs(cfg, executor)
    _claim_output(cfg, resume)
    plans = plan_shards(source, shard_size, limit)
    shards_url = storage.join(cfg.out_url, "shards")
    pending = [p for p in plans if not storage.exists(shard_urls(shards_url, p.index)[1])]
    if executor == "ray":
        results = _run_on_ray(cfg, pending, progress, on_shard)
    else:
        results = _run_local(cfg, pending, progress, on_shard)
    result = finalize(cfg, len(plans))
    result.shards_written = sum(1 for r in results if not r["skipped"])
    result.shards_skipped = len(plans) - result.shards_written
    result.seconds = time.perf_counter() - t0
    return result


def validate_inputs(cfg: IngestConfig, executor: str = "ray") -> Source:
    """Fail fast, with one line, before any work: bad format, missing source, unwritable output."""
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    if executor == "ray" and any(u.startswith("memory://") for u in (cfg.source_url, cfg.out_url)):
        raise ValueError("memory:// lives inside one process; Ray workers cannot see it (use executor='local')")
    if cfg.size < 8:
        raise ValueError(f"--size must be at least 8, got {cfg.size}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {cfg.shard_size}")
    source = get_source(cfg.source_format, cfg.source_url, **cfg.source_options)
    source.validate()
    storage.check_writable(cfg.out_url)
    return source


def _claim_output(cfg: IngestConfig, resume: bool) -> None:
    config_url = storage.join(cfg.out_url, "_config.json")
    wanted = json.loads(json.dumps(cfg.identity(), sort_keys=True, default=str))
    if storage.exists(config_url):
        found = storage.read_json(config_url)
        if found != wanted:
            raise OutputConflict(f"{cfg.out_url} holds a run with a different config; use another --out")
        finished = storage.exists(storage.join(cfg.out_url, "manifest.json"))
        if not finished and not resume:
            raise OutputConflict(f"{cfg.out_url} holds an unfinished run; pass --resume to finish it")
        return
    storage.write_json(config_url, wanted)


def _run_on_ray(cfg: IngestConfig, pending: list[ShardPlan], progress: bool,
                on_shard: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """One Ray Data task per pending shard; retried if its worker or node dies (shards are atomic)."""
    if not pending:
        return []
    import ray

    from tasks.ray_runtime import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    items = [{"plan": json.dumps(asdict(p))} for p in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data retries a task whose worker or node died (max_retries=-1 by default); shards are
    # atomic and deterministic, so a retry rewrites the same bytes.
    ds = ds.map(_shard_task, fn_kwargs={"cfg": cfg}, num_cpus=1)
    bar = _progress_bar(sum(p.size for p in pending), progress)
    out = []
    for row in ds.iter_rows():
        row = dict(row)
        out.append(row)
        bar.update(row["samples"] + row["rejects"])
        if on_shard:
            on_shard(row)
    bar.close()
    return out


def _run_local(cfg: IngestConfig, pending: list[ShardPlan], progress: bool,
               on_shard: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    bar = _progress_bar(sum(p.size for p in pending), progress)
    out = []
    for plan in pending:
        row = process_shard(cfg, plan)
        out.append(row)
        bar.update(row["samples"] + row["rejects"])
        if on_shard:
            on_shard(row)
    bar.close()
    return out


def _shard_task(item: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    r = process_shard(cfg, ShardPlan(**json.loads(item["plan"])))
    return {"shard": r["shard"], "skipped": r["skipped"], "samples": r["samples"], "rejects": r["rejects"],
            "seconds": float(r.get("seconds", 0.0))}


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, desc="ingest")


def finalize(cfg: IngestConfig, num_shards: int) -> IngestResult:
    """Gather every shard's index into the rejects table and the manifest (both atomic)."""
    shards_url = storage.join(cfg.out_url, "shards")
    rejects: list[dict[str, Any]] = []
    shards: list[dict[str, Any]] = []
    for i in range(num_shards):
        tar_url, index_url = shard_urls(shards_url, i)
        rows = read_index(index_url).select(["source_id", "status", "reason"]).to_pylist()
        rej = [{"source_id": r["source_id"], "reason": r["reason"], "shard": i} for r in rows
               if r["status"] != "ok"]
        rejects.extend(rej)
        shards.append({"tar": f"shards/{tar_url.rsplit('/', 1)[-1]}", "samples": len(rows) - len(rej),
                       "rejects": len(rej)})
    reasons = Counter(r["reason"] for r in rejects)
    samples = sum(s["samples"] for s in shards)
    rej_schema = pa.schema([("source_id", pa.string()), ("reason", pa.string()), ("shard", pa.int32())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rejects, schema=rej_schema), buf, compression="zstd")
    storage.write_bytes(storage.join(cfg.out_url, "rejects.parquet"), buf.getvalue())
    manifest = {
        "kind": "cnc-ingest",
        "counts": {"inputs": samples + len(rejects), "samples": samples, "rejects": len(rejects),
                   "rejects_by_reason": dict(sorted(reasons.items()))},
        "config": cfg.identity(),
        "versions": versions(),
        "shards": shards,
    }
    storage.write_json(storage.join(cfg.out_url, "manifest.json"), manifest)
    urls = [shard_urls(shards_url, i)[0] for i in range(num_shards)]
    return IngestResult(cfg.out_url, samples + len(rejects), samples, len(rejects), dict(reasons), urls)
