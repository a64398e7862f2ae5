"""The ingest stage: source images -> WebDataset shards of centre crops, a job of the shard runner.

Plan: list the source into refs (no bytes), assign them to shards deterministically (consecutive
runs of ``shard_size`` refs in listing order). Run (:mod:`tasks.shard_job`: a Ray task, a pool
process or this process per pending shard): stream the shard's items through
:func:`tasks.imaging.prepare_image` into the shard's writer. A shard is published atomically, so
a killed worker or node only costs a retry of that shard, and a re-run skips every committed
shard. Finish: the runner gathers the indexes into ``rejects.parquet``; :class:`IngestJob` writes
``manifest.json``. Every input ends as exactly one index row: a sample or a reject with a reason.

Growing (``extend=True``, :mod:`tasks.extend`): on a finished output a new segment of shards is
planned after the existing ones from the refs whose source id the output does not hold yet, plus
the retryable (transient) rejects, which are tried again; a new input whose bytes equal a sample's
of an earlier segment is a ``duplicate`` row (``duplicate_content``). Earlier shards are never
rewritten. ``resume=True`` on a finished output with retryable rejects opens a segment that
retries only them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from tasks import extend as growth
from tasks import storage
from tasks.ingest_config import IngestConfig
from tasks.manifest import versions
from tasks.run_options import EXECUTORS
from tasks.shard_job import (PROPAGATE, OutputConflict, RunOptions, RunReport, Shard, ShardJob, describe,
                             is_transient, run_shard_job)
from tasks.shards import OK, ShardWriter, read_index, shard_name, shard_urls
from tasks.sources import get_source
from tasks.sources.base import Source, SourceItem

log = logging.getLogger(__name__)

DUPLICATE = "duplicate_source_id"
DUPLICATE_CONTENT = "duplicate_content"
MAX_CAPTION_CHARS = 4096


def sample_key(source_id: str) -> str:
    """A stable, filename-safe WebDataset key for a source id."""
    return hashlib.sha1(source_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]


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
    num_duplicates: int = 0  # inputs whose bytes were already in the output (index rows, status duplicate)
    num_present: int = 0  # listed refs already in the output by source id (skipped, no new row)
    num_retried: int = 0  # retryable rejects that a later shard tried again
    num_inputs_run: int = 0  # inputs of the shards this run wrote (resumed or re-run: fewer than num_inputs)

    @property
    def images_per_second(self) -> float:
        """This run's inputs per second."""
        return self.num_inputs_run / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        dup = f" + {self.num_duplicates} duplicates" if self.num_duplicates else ""
        present = f"; {self.num_present} listed inputs were already there" if self.num_present else ""
        return (f"{self.num_inputs} inputs -> {self.num_samples} samples + {self.num_rejects} rejects{dup} in "
                f"{len(self.shard_urls)} shards ({self.shards_written} written, {self.shards_skipped} already done) "
                f"at {self.out_url}{present}")


# ---------------------------------------------------------------------------------------- plan


@dataclass
class ShardPlan:
    """Shard ``index`` loads ``load`` and rejects ``duplicates`` (refs listed earlier in the source).
    ``where``: the listing's location of each ref of ``load`` (None where unknown); empty when the
    source records none."""

    index: int
    load: list[str]
    duplicates: list[str]
    where: list[Any] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.load) + len(self.duplicates)


def plan_shards(source: Source, shard_size: int, limit: int | None = None) -> list[ShardPlan]:
    """Consecutive runs of ``shard_size`` refs in listing order. A ref listed again is kept in the
    plan as a duplicate (it becomes a reject), so the count of inputs is the count of listed refs."""
    return plan_refs(_listed(source, limit), shard_size)


def _listed(source: Source, limit: int | None) -> Iterator[tuple[str, Any]]:
    for n, entry in enumerate(source.list_entries()):
        if limit is not None and n >= limit:
            return
        yield entry


def plan_refs(entries: Iterator[tuple[str, Any]], shard_size: int, first: int = 0) -> list[ShardPlan]:
    """:func:`plan_shards` over any (ref, location) entries, numbering the shards from ``first``."""
    plans: list[ShardPlan] = []
    seen: set[str] = set()
    for ref, where in entries:
        if not plans or plans[-1].size == shard_size:
            plans.append(ShardPlan(first + len(plans), [], []))
        if ref in seen:
            plans[-1].duplicates.append(ref)
        else:
            plans[-1].load.append(ref)
            plans[-1].where.append(where)
        seen.add(ref)
    for p in plans:
        if all(w is None for w in p.where):
            p.where = []
    return plans


def plan_extension(source: Source, shard_size: int, limit: int | None, existing: growth.Existing,
                   listing: bool) -> tuple[list[ShardPlan], int]:
    """A segment after ``existing``: its retryable rejects first, then (``listing``) the listed refs
    the output does not hold. Returns the plans and how many listed refs were already there."""
    present = 0
    retry = set(existing.retry)

    def refs() -> Iterator[tuple[str, Any]]:
        nonlocal present
        for ref in existing.retry:
            yield ref, None
        if not listing:
            return
        for ref, where in _listed(source, limit):
            if ref in existing.source_ids and ref not in retry:
                present += 1
                continue
            if ref not in retry:
                yield ref, where

    plans = plan_refs(refs(), shard_size, first=existing.shards)
    return plans, present


# --------------------------------------------------------------------------------- one shard


def process_shard(cfg: IngestConfig, plan: ShardPlan, input_hash: str | None = None,
                  known_content: np.ndarray | None = None) -> dict[str, Any]:
    """Write shard ``index`` (or skip it if committed). A bad input becomes a reject; a transient
    read error (or a bug) raises, so the runner retries the shard. An input whose bytes are in
    ``known_content`` (the sorted hash prefixes of the samples of the output's earlier segments)
    becomes a ``duplicate`` row."""
    from tasks.imaging import RejectError, prepare_image, prepare_label_map

    tar_url, index_url = shard_urls(storage.join(cfg.out_url, "shards"), plan.index)
    if storage.exists(index_url):
        return {"skipped": True, **_counts_of(index_url)}
    source = get_source(cfg.source_format, cfg.source_url, **cfg.source_options)
    known = known_content if known_content is not None else np.zeros(0, dtype=np.uint64)
    columns = {growth.CONTENT_HASH: pa.string()}
    with ShardWriter(tar_url, index_url, columns, input_hash=input_hash) as writer:
        for item in _load_accounted(source, plan.load, plan.where):
            key = sample_key(item.source_id)
            if item.error:
                writer.add_reject(item.source_id, item.error, key, detail=item.meta.get("detail", ""),
                                  retryable=bool(item.meta.get("retryable")))
                continue
            digest = growth.content_hash(item.image) if item.image else ""
            if digest and growth.contains(known, digest):
                writer.add_duplicate(item.source_id, DUPLICATE_CONTENT, key, content_hash=digest,
                                     detail="the same bytes are already in the output")
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
                writer.add_reject(item.source_id, exc.reason, key, detail=exc.message)
                continue
            except PROPAGATE:
                raise
            except Exception as exc:  # noqa: BLE001 - a decoder's error on one input is that input's reject
                writer.add_reject(item.source_id, "unexpected_error", key, detail=describe(exc))
                continue
            writer.add_sample(key, item.source_id, files, caption, content_hash=digest)
        for ref in plan.duplicates:
            writer.add_reject(ref, DUPLICATE, sample_key(ref))
        counts = writer.commit()
    return {"skipped": False, **counts}


def _load_accounted(source: Source, refs: list[str], where: list[Any] | None = None) -> Iterator[SourceItem]:
    """``source.load`` (``load_located`` given the listing's locations) with the one-item-per-ref
    promise enforced. A reader that fails mid-way with a transient error (or a bug) fails the shard,
    to be retried; with any other error it turns the rest of its refs into rejects
    (``source_read_error``, with the detail) instead of losing them."""
    done = 0
    items = source.load_located(refs, where) if where else source.load(refs)
    try:
        for item in items:
            if done >= len(refs):
                break
            if item.source_id != refs[done]:
                item = SourceItem(refs[done], error="reader_order_error", meta={"detail": f"got {item.source_id!r}"})
            done += 1
            yield item
    except PROPAGATE:
        raise
    except Exception as exc:  # noqa: BLE001 - filtered: transient errors and bugs raise above
        if is_transient(exc):
            raise
        for ref in refs[done:]:
            yield SourceItem(ref, error="source_read_error", meta={"detail": describe(exc)})
        return
    for ref in refs[done:]:
        yield SourceItem(ref, error="reader_returned_nothing")


def _counts_of(index_url: str) -> dict[str, int]:
    status = read_index(index_url).column("status").to_pylist()
    ok = sum(1 for s in status if s == OK)
    dup = sum(1 for s in status if s == "duplicate")
    return {"samples": ok, "rejects": len(status) - ok - dup, "duplicates": dup}


# ------------------------------------------------------------------------------------- the job


@dataclass
class IngestJob(ShardJob):
    """Ingest as a :class:`tasks.shard_job.ShardJob`: a shard's inputs are its listed refs."""

    cfg: IngestConfig
    kind: str = "ingest"
    unit: str = "img"
    extendable: bool = True
    known_content: np.ndarray | None = None  # set by plan: the earlier segments' sample hash prefixes
    present: int = 0  # set by plan: listed refs already in the output
    segments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def out_url(self) -> str:  # type: ignore[override]
        return self.cfg.out_url

    def in_process_only(self) -> bool:
        return any(u.startswith("memory://") for u in (self.cfg.source_url, self.cfg.out_url))

    def identity(self) -> dict[str, Any]:
        return self.cfg.identity()

    def begin(self, opts: RunOptions, finished: bool) -> None:
        """On a finished output, ``extend`` opens a segment for new inputs and retryable rejects;
        ``resume`` opens one for the retryable rejects alone, when there are any."""
        self.segments = growth.segments(self.out_url)
        if not finished or not (opts.extend or (opts.resume and growth.has_retryable_rejects(self.out_url))):
            return
        first = growth.committed_count(self.shards_url)
        if first > self.segments[-1]["first_shard"] or self.segments[-1].get("listing", True) != opts.extend:
            self.segments = growth.open_segment(self.out_url, first, listing=opts.extend)

    def plan(self) -> list[Shard]:
        source = get_source(self.cfg.source_format, self.cfg.source_url, **self.cfg.source_options)
        segment = (self.segments or growth.segments(self.out_url))[-1]
        first = int(segment["first_shard"])
        if first == 0:
            return [self._located(self.shard(p.index, {"load": p.load, "duplicates": p.duplicates}, p.size), p)
                    for p in plan_shards(source, self.cfg.shard_size, self.cfg.limit)]
        existing = growth.scan(self.shards_url, first)
        self.known_content = existing.content
        plans, self.present = plan_extension(source, self.cfg.shard_size, self.cfg.limit, existing,
                                             segment.get("listing", True))
        kept = [Shard(i, None, 0, growth.kept_shard_hash(self.shards_url, i), self.shards_url) for i in range(first)]
        return kept + [self._located(self.shard(p.index, {"load": p.load, "duplicates": p.duplicates,
                                                          "after": first}, p.size), p)
                       for p in plans]

    @staticmethod
    def _located(shard: Shard, plan: ShardPlan) -> Shard:
        """The listing's locations travel with the shard's inputs but stay out of its input hash:
        they say where to read, not what (the same refs give the same shard)."""
        return replace(shard, inputs={**shard.inputs, "where": plan.where}) if plan.where else shard

    def process_shard(self, shard: Shard) -> dict[str, Any]:
        plan = ShardPlan(shard.index, list(shard.inputs["load"]), list(shard.inputs["duplicates"]),
                         list(shard.inputs.get("where", [])))
        return process_shard(self.cfg, plan, shard.input_hash, self.known_content)

    def finalize(self, report: RunReport) -> IngestResult:
        """The manifest (counts, config, versions, shards); the runner has written rejects.parquet."""
        shards = [{"tar": f"shards/{shard_name(i)}.tar", "samples": ok, "rejects": rej,
                   "duplicates": report.shard_duplicates.get(i, 0)}
                  for i, ok, rej in report.shard_counts]
        reasons = report.reasons
        report.write_manifest({
            "kind": "cnc-ingest",
            "counts": {"inputs": report.inputs, "samples": report.samples, "rejects": len(report.rejects),
                       "duplicates": report.duplicates, "retried": report.retried,
                       "rejects_by_reason": dict(sorted(reasons.items()))},
            "config": self.cfg.identity(),
            "versions": versions(),
            "segments": [s["first_shard"] for s in self.segments or growth.segments(self.out_url)
                         if s["first_shard"] == 0 or s["first_shard"] < len(report.shards)],  # not an empty one
            "shards": shards,
        })
        urls = [s.tar_url for s in report.committed]
        return IngestResult(self.cfg.out_url, report.inputs, report.samples, len(report.rejects), reasons, urls,
                            shards_written=len(report.written),
                            shards_skipped=len(report.shards) - len(report.written) - len(report.failed),
                            num_duplicates=report.duplicates, num_present=self.present, num_retried=report.retried,
                            num_inputs_run=report.inputs_run)


# ------------------------------------------------------------------------------------- driver


def run_ingest(source_format: str, source_url: str, out_url: str, *, size: int = 512, shard_size: int = 256,
               quality: int = 95, min_side: int = 64, resume: bool = False, extend: bool = False,
               limit: int | None = None,
               progress: bool = False, on_shard: Callable[[dict[str, Any]], None] | None = None,
               executor: str = "ray", run_options: RunOptions | None = None, **source_options: Any) -> IngestResult:
    """Shard a source into WebDataset tars. See the module docstring.

    ``executor="ray"`` runs one Ray task per shard (local Ray, or the cluster at ``RAY_ADDRESS``);
    ``"processes"`` a pool of worker processes on this machine; ``"local"`` the shards one after
    another in this process (debugging, ``memory://`` URLs, baselines); ``"auto"`` picks one
    (:func:`tasks.shard_job.choose_executor`). All write the same bytes. ``run_options`` sets the runner's retries, timeout, lease and reject share
    (:class:`tasks.shard_job.RunOptions`); ``executor``, ``resume``, ``extend``, ``progress`` and
    ``on_shard`` override its fields. ``extend`` appends the source's new inputs to a finished output
    (see the module docstring).
    """
    cfg = IngestConfig(source_format, source_url, out_url.rstrip("/"), size, shard_size, quality, min_side, limit,
                       dict(source_options))
    t0 = time.perf_counter()
    validate_inputs(cfg, executor)
    opts = replace(run_options or RunOptions(), executor=executor, resume=resume, extend=extend,
                   progress=progress, on_shard=on_shard)
    result = run_shard_job(IngestJob(cfg), opts)
    result.seconds = time.perf_counter() - t0
    return result


def validate_inputs(cfg: IngestConfig, executor: str = "ray") -> Source:
    """Fail fast, with one line, before any work: bad format, missing source, unwritable output."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor in ("ray", "processes") and any(u.startswith("memory://") for u in (cfg.source_url, cfg.out_url)):
        raise ValueError(f"memory:// lives inside one process; {executor} workers cannot see it "
                         "(use executor='local')")
    if cfg.size < 8:
        raise ValueError(f"--size must be at least 8, got {cfg.size}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {cfg.shard_size}")
    source = get_source(cfg.source_format, cfg.source_url, **cfg.source_options)
    source.validate()
    storage.check_writable(cfg.out_url)
    return source
