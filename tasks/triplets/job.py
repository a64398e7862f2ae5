"""build-triplets: ingested shards -> CnC triplet shards, streamed through the model stages.

    ingest shards ─read─▶ saliency ─▶ [mask filter ▶ foreground ▶ inpaint] ─▶ depth ─▶ [clip] ─stage─▶ assemble
                          (each model stage is an actor pool: the model loads once per actor; the
                           numpy-only stages run inside the inpainting actors; the last pool stages
                           its results itself. Pool sizes: :mod:`tasks.triplets.resources`)

On one machine without a cluster (``executor`` ``processes``, what ``auto`` picks there) the same
stages run in a pool of spawned worker processes instead: each loads the models once and runs every
stage on its share of a shard (no Ray start, every core busy even for one shard).

Samples travel as encoded bytes. Finished batches are staged at once (see
:mod:`tasks.triplets.staging`); a shard is assembled, in ingest order, as soon as its last sample
is staged. Every source ends as a triplet or a reject: ingest rejects are carried over
(``ingest:<reason>``) so ``triplets + rejects == sources`` holds for the whole chain.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tasks import storage
from tasks.manifest import versions
from tasks.shard_job import (PROPAGATE, RunOptions, RunReport, Shard, ShardJob, choose_executor, describe,
                             run_shard_job)
from tasks.shards import iter_tar_samples, read_index, shard_name, shard_urls
from tasks.triplets import staging
from tasks.triplets import resources as pools
from tasks.triplets.config import StageOptions, TripletsConfig  # noqa: F401 - StageOptions is re-exported
from tasks.triplets.stage_runner import StageRunner

log = logging.getLogger(__name__)

# stage column -> file name inside a triplet sample (see docs/data-format.md)
OUTPUT_FILES = {
    "jpg": "src.jpg",
    "mask_png": "mask.png",
    "fg_png": "fg.png",
    "bg_jpg": "bg.jpg",
    "depth_fg_png": "depth_fg.png",
    "depth_bg_png": "depth_bg.png",
    "clip_fg_npy": "clip_fg.npy",
    "clip_bg_npy": "clip_bg.npy",
    "latents_npy": "latents.npy",
}
MALFORMED = "malformed_ingest_sample"
_INTERNAL = {"key", "source_id", "txt", "reject", "shard", "dilated_png", *OUTPUT_FILES}
_BOOKKEEPING = ("_t_", "_w_")  # per-row stage seconds and the worker that ran a stage: never stored


@dataclass
class TripletsResult:
    out_url: str
    num_sources: int
    num_triplets: int
    num_rejects: int
    rejects_by_reason: dict[str, int]
    shard_urls: list[str]
    stage_seconds: dict[str, float]
    preview_url: str | None = None
    shards_written: int = 0
    seconds: float = 0.0
    manifest_sha256: str = ""  # of the manifest.json this run wrote (names the data a model was trained on)
    num_duplicates: int = 0  # ingest duplicates carried over (--extend: bytes already in the output)
    executor: str = ""
    # stage -> how many processes (Ray actors or pool workers) ran it in this run
    stage_workers: dict[str, int] = field(default_factory=dict)
    num_inputs_run: int = 0  # sources of the shards this run wrote (resumed or re-run: fewer)
    num_computed: int = 0  # samples that went through the model stages in this run

    def summary(self) -> str:
        dup = f" + {self.num_duplicates} duplicates" if self.num_duplicates else ""
        workers = self.stage_workers.get("inpaint")
        on = f" ({workers} inpainting workers)" if workers else ""
        return (f"{self.num_sources} sources -> {self.num_triplets} triplets + {self.num_rejects} rejects{dup} in "
                f"{len(self.shard_urls)} shards at {self.out_url}{on}")


class TripletsInputError(ValueError):
    """The input is not a finished ingest output, or the output holds something else."""


# ------------------------------------------------------------------------------------ reading


def ingest_rows(ingest_url: str, shard: int, skip: set[str]) -> Iterator[dict[str, Any]]:
    """The ingested samples of one shard as stage rows, minus keys already staged. A malformed
    sample (no image, unreadable metadata or caption) travels on as a reject row, never a crash."""
    tar_url, _ = shard_urls(storage.join(ingest_url, "shards"), shard)
    for s in iter_tar_samples(tar_url):
        if s["__key__"] in skip:
            continue
        yield _ingest_row(shard, s)


def _ingest_row(shard: int, s: dict[str, Any]) -> dict[str, Any]:
    key = s["__key__"]
    row = {"shard": shard, "key": key, "source_id": key, "jpg": b"", "txt": "", "mask_png": b"", "reject": ""}
    try:
        meta = json.loads(s.get("json", b"{}"))
        row["source_id"] = str(meta.get("source_id", key)) if isinstance(meta, dict) else key
        row["txt"] = s.get("txt", b"").decode("utf-8")
        row["mask_png"] = bytes(s.get("mask.png", b""))
        row["jpg"] = bytes(s["jpg"])
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        row["reject"] = f"{MALFORMED}: {type(exc).__name__}"
    return row


def _flat_read(item: dict[str, Any], ingest_url: str) -> Iterator[dict[str, Any]]:
    # An unreadable ingest shard ends this block; its samples are then missing from staging, so
    # the runner records the shard as failed instead of the whole job dying.
    part, parts = int(item.get("part", 0)), int(item.get("parts", 1))
    for n, row in enumerate(ingest_rows(ingest_url, int(item["shard"]), set(json.loads(item["skip"])))):
        if n % parts == part:
            yield row


# ------------------------------------------------------------------------------------ staging


def batch_to_rows(batch: dict[str, np.ndarray], preset_ids: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Finished stage columns -> rows for :func:`staging.write_part` (files keyed by sample name)."""
    n = len(batch["key"])
    extra_cols = [c for c in batch if c not in _INTERNAL and not c.startswith(_BOOKKEEPING)]
    for i in range(n):
        reject = str(batch["reject"][i] or "")
        files: dict[str, bytes] = {}
        if not reject:
            for col, name in OUTPUT_FILES.items():
                if col in batch and len(batch[col][i]):
                    files[name] = bytes(batch[col][i])
            caption = str(batch["txt"][i])
            if caption:
                files["txt"] = caption.encode("utf-8")
            meta = {"source_id": str(batch["source_id"][i]), "key": str(batch["key"][i]), "models": preset_ids}
            for c in extra_cols:
                v = batch[c][i]
                meta[c] = v.item() if hasattr(v, "item") else v
            files["json"] = json.dumps(meta, sort_keys=True, default=str).encode()
        yield {"key": str(batch["key"][i]), "source_id": str(batch["source_id"][i]), "caption": str(batch["txt"][i]),
               "files": files, "reject": reject}


def stage_batch(batch: dict[str, np.ndarray], out_url: str, preset_ids: dict[str, Any]) -> dict[str, np.ndarray]:
    """Write a finished batch as one part per shard; report (shard, count, stage seconds, the
    workers that ran each stage)."""
    shards = np.asarray(batch["shard"]).astype(np.int64)
    rows = list(batch_to_rows(batch, preset_ids))
    timing_cols = [c for c in batch if c.startswith("_t_")]
    worker_cols = [c for c in batch if c.startswith("_w_")]
    out: dict[str, list] = {"shard": [], "n": [], "timings": [], "workers": []}
    for s in sorted(set(shards.tolist())):
        idx = np.nonzero(shards == s)[0]
        staging.write_part(out_url, s, [rows[i] for i in idx])
        out["shard"].append(s)
        out["n"].append(len(idx))
        out["timings"].append(json.dumps({c[3:]: float(np.sum(batch[c][idx])) for c in timing_cols}))
        out["workers"].append(json.dumps({c[3:]: sorted({str(w) for w in batch[c][idx]}) for c in worker_cols}))
    return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------- the job


@dataclass
class TripletsJob(ShardJob):
    """build-triplets as a :class:`tasks.shard_job.ShardJob`: triplet shard ``i`` is made from
    ingest shard ``i`` (its index rows are the shard's inputs). The shards stream through the
    stages as one Ray Data job, a process pool or this process, so the job supplies
    :meth:`run_pending`."""

    cfg: TripletsConfig
    ingest_manifest: dict[str, Any]
    kind: str = "build-triplets"
    unit: str = "img"
    extendable: bool = True
    stage_seconds: Counter = field(default_factory=Counter)
    stage_workers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    computed: int = 0
    executor: str = ""

    @property
    def executors(self) -> tuple[str, ...]:  # type: ignore[override]
        """Actor-pool settings (GPUs, pool sizes, memory) are Ray's: such a job runs on Ray or here."""
        return ("ray", "local") if self.cfg.needs_ray() else ("ray", "processes", "local")

    @property
    def out_url(self) -> str:  # type: ignore[override]
        return self.cfg.out_url

    def in_process_only(self) -> bool:
        return any(u.startswith("memory://") for u in (self.cfg.ingest_url, self.cfg.out_url))

    def identity(self) -> dict[str, Any]:
        return self.cfg.identity()

    def parallel_units(self, pending: list[Shard], opts: RunOptions) -> int:
        """Workers that would each get at least two model batches (batches, not shards: a one-shard
        job of many batches still keeps every worker busy). Every worker pays the model imports and
        builds (~8 CPU-s for the tiny preset, docs/benchmarks.md), so ``auto`` starts a pool only
        when at least two workers have that much to do; a smaller job runs in this process."""
        bs = self.cfg.options("inpaint").batch_size
        batches = sum(-(-(s.size or 0) // bs) for s in pending)
        return min(batches // 2, pool_workers(self.cfg, opts))

    def plan(self) -> list[Shard]:
        """One shard per ingest shard; a grown ingest (``--extend``) adds shards after the existing ones."""
        ingest_shards = storage.join(self.cfg.ingest_url, "shards")
        out = []
        for i in range(len(self.ingest_manifest["shards"])):
            shard = self.shard(i, *_ingest_inputs(shard_urls(ingest_shards, i)[1]))
            if storage.exists(shard.index_url):  # committed: only its input hash is checked, its rows not held
                shard = replace(shard, inputs=None)
            out.append(shard)
        return out

    def run_pending(self, pending: list[Shard], opts: RunOptions, done: Callable, failed: Callable) -> None:
        self.executor = opts.executor
        todo: dict[int, set[str]] = {}
        for s in pending:
            staged = set(staging.staged_rows(self.cfg.out_url, s.index))
            todo[s.index] = {r["key"] for r in s.inputs if r["status"] == "ok"} - staged

        def ran(timings: dict[str, float], workers: dict[str, list[str]], samples: int) -> None:
            self.computed += samples
            self.stage_seconds.update(timings)
            for stage, ids in workers.items():
                self.stage_workers[stage].update(ids)

        if opts.executor == "ray":
            _run_on_ray(self.cfg, pending, todo, ran, opts, done, failed)
        elif opts.executor == "processes":
            _run_in_processes(self.cfg, pending, todo, ran, opts, done, failed)
        else:
            _run_local(self.cfg, pending, todo, ran, done, failed)

    def finalize(self, report: RunReport) -> TripletsResult:
        result = finalize(self.cfg, self.ingest_manifest, report, dict(self.stage_seconds))
        result.executor = self.executor or report.executor
        result.stage_workers = {k: len(v) for k, v in sorted(self.stage_workers.items())}
        result.num_inputs_run, result.num_computed = report.inputs_run, self.computed
        return result


def _ingest_inputs(index_url: str) -> tuple[list[dict[str, Any]], int]:
    """A triplet shard's inputs: its ingest shard's rows (key, source_id, status, reason, and
    ``retryable`` only where true, so shards planned before that flag existed keep their hash)."""
    table = read_index(index_url)
    rows = table.select(["key", "source_id", "status", "reason"]).to_pylist()
    if "retryable" in table.column_names:
        for row, flag in zip(rows, table.column("retryable").to_pylist()):
            if flag:
                row["retryable"] = True
    return rows, len(rows)


# ------------------------------------------------------------------------------------- driver


def run_triplets(ingest_url: str, out_url: str, *, preset: str = "tiny", clip: bool = False,
                 latents: bool = False, stages: dict[str, StageOptions] | None = None, resume: bool = False,
                 extend: bool = False, progress: bool = False, executor: str = "auto",
                 on_shard: Callable[[int], None] | None = None,
                 run_options: RunOptions | None = None) -> TripletsResult:
    """Turn a finished ingest output into triplet shards. Idempotent and resumable per sample.

    ``extend``: the ingest output has grown (``ingest --extend``); its new shards become new triplet
    shards after the existing ones, which are kept as they are. ``run_options`` sets the runner's
    retries, lease and reject share (:class:`tasks.shard_job.RunOptions`). ``executor``: ``auto``
    (Ray with ``RAY_ADDRESS`` or GPU stages, else a process pool on this machine), ``ray``,
    ``processes`` or ``local``; all write the same bytes."""
    t0 = time.perf_counter()
    cfg = TripletsConfig(ingest_url.rstrip("/"), out_url.rstrip("/"), preset, clip, latents, dict(stages or {}))
    ingest_manifest = _validate(cfg, executor)
    job = TripletsJob(cfg, ingest_manifest)
    if choose_executor(executor, job)[0] == "ray":  # the runner makes the final choice (and says why)
        _plan_ray_pools(cfg, warn=True)  # a request that cannot fit fails here, before the output is claimed
    opts = replace(run_options or RunOptions(), executor=executor, resume=resume, extend=extend, progress=progress,
                   on_shard=(lambda row: on_shard(row["shard"])) if on_shard else None)
    result = run_shard_job(job, opts)
    result.seconds = time.perf_counter() - t0
    return result


def check_executor(cfg: TripletsConfig, executor: str) -> None:
    """Raise ``ValueError`` for an executor these stages cannot run on (before any work)."""
    if executor not in ("auto", "ray", "processes", "local"):
        raise ValueError(f"build-triplets runs on ray, processes or local (or auto), not {executor!r}")
    if executor == "processes" and cfg.needs_ray():
        raise ValueError("stage pools with GPUs, actor counts or memory run on Ray: use executor 'ray' "
                         "(or 'auto') instead of 'processes'")
    if executor in ("ray", "processes") and any(u.startswith("memory://") for u in (cfg.ingest_url, cfg.out_url)):
        raise ValueError("memory:// lives inside one process; workers cannot see it (use executor='local')")


def _validate(cfg: TripletsConfig, executor: str) -> dict[str, Any]:
    from cnc_model.presets import get_preset

    check_executor(cfg, executor)
    get_preset(cfg.preset)
    for name, opt in cfg.stages.items():
        if name not in cfg.stage_names():
            raise ValueError(f"unknown stage {name!r} in stage options; stages: {', '.join(cfg.stage_names())}")
        if name in _model_free() and (opt.num_cpus or opt.num_gpus or opt.min_actors or opt.max_actors
                                      or opt.memory_gib):
            host = next(g[-1] for g in pools.pool_groups(cfg.stage_names(), _model_free()) if name in g)
            raise ValueError(f"stage {name!r} runs inside the {host!r} actors; give resources to {host!r}")
    manifest_url = storage.join(cfg.ingest_url, "manifest.json")
    if not storage.exists(manifest_url):
        raise TripletsInputError(f"{cfg.ingest_url} is not a finished ingest output (no manifest.json)")
    manifest = storage.read_json(manifest_url)
    if manifest.get("kind") != "cnc-ingest":
        raise TripletsInputError(f"{cfg.ingest_url} is not an ingest output (kind {manifest.get('kind')!r})")
    if manifest.get("failed_shards"):
        shards = ", ".join(str(f["shard"]) for f in manifest["failed_shards"])
        raise TripletsInputError(f"{cfg.ingest_url} is an unfinished ingest output (failed shards: {shards}); "
                                 f"rerun the ingest with --resume first")
    storage.check_writable(cfg.out_url)
    return manifest


def _plan_ray_pools(cfg: TripletsConfig, batches: int | None = None, warn: bool = False) -> dict[str, pools.PoolPlan]:
    """Starts or joins Ray and sizes the actor pools (one per entry of ``pool_groups``, named by
    its last stage) on the cluster's resources. A plan that does not fit is an error on a local
    Ray; on a joined cluster (which may grow) it is logged once, when ``warn``."""
    from tasks.ray_runtime import init_ray, joined_cluster

    resources = init_ray()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    names = [g[-1] for g in pools.pool_groups(cfg.stage_names(), _model_free())]
    elastic = joined_cluster()
    plans = pools.plan_pools(names, cfg.stages, cpus, gpus, batches=batches, elastic=elastic)
    try:
        pools.check_fits(plans, cpus, gpus)
    except pools.ResourceError as exc:
        if not elastic:  # a local Ray's resources are fixed: Ray Data would wait forever
            raise
        if warn:
            log.warning("%s; the job waits until the cluster has grown to fit", exc)
    return plans


def runs_on_ray(cfg: TripletsConfig, executor: str) -> bool:
    """Whether ``executor`` (``auto`` included) runs these stages on Ray, decided without starting
    or importing anything heavy."""
    return choose_executor(executor, TripletsJob(cfg, {}))[0] == "ray"


def check_pool_plan(cfg: TripletsConfig) -> None:
    """Raise :class:`tasks.triplets.resources.ResourceError` when the stage pools cannot fit the
    local Ray this machine would start, without starting it (so a command can refuse before any
    work). A joined cluster (``RAY_ADDRESS``) may grow: nothing is checked there."""
    import os

    import ray

    from tasks.ray_runtime import joined_cluster

    if joined_cluster():
        return
    if ray.is_initialized():
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    else:
        import torch

        cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    names = [g[-1] for g in pools.pool_groups(cfg.stage_names(), _model_free())]
    pools.check_fits(pools.plan_pools(names, cfg.stages, cpus, gpus), cpus, gpus)


def _model_free() -> set[str]:
    from tasks.triplets.stages import STAGE_CLASSES

    return {name for name, cls in STAGE_CLASSES.items() if not cls.has_model}


def _stage_args(cfg: TripletsConfig, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, {"batch_size": cfg.options(n).batch_size, **cfg.options(n).cfg}) for n in names]


def _preset_ids(cfg: TripletsConfig) -> dict[str, Any]:
    from cnc_model.presets import get_preset

    return get_preset(cfg.preset).to_dict()


def _run_on_ray(cfg: TripletsConfig, pending: list[Shard], todo: dict[int, set[str]], ran: Callable,
                opts: RunOptions, done: Callable, failed: Callable) -> None:
    import ray

    from tasks.ray_runtime import quiet_ray_data

    quiet_ray_data()
    groups = pools.pool_groups(cfg.stage_names(), _model_free())
    # Ray Data bundles rows across shards into batches: this many reach the inpainting pool
    batches = -(-sum(len(t) for t in todo.values()) // cfg.options("inpaint").batch_size)
    plans = _plan_ray_pools(cfg, batches=max(1, batches))
    assemble = ray.remote(num_cpus=pools.TASK_CPUS, max_retries=max(0, opts.max_attempts - 1))(_assemble)
    by_index = {s.index: s for s in pending}
    futures = {s.index: assemble.remote(cfg.out_url, s) for s in pending if not todo[s.index]}
    streaming = [s.index for s in pending if todo[s.index]]
    if streaming:
        ctx = ray.data.DataContext.get_current()
        # A block that still fails after its retries is dropped: its samples are then missing from
        # staging, assembly refuses the shard, and the runner records it as failed. Nothing is lost
        # silently and one bad shard does not end the job.
        ctx.max_errored_blocks = -1
        retries = {"max_retries": max(0, opts.max_attempts - 1)}
        actors = max(p.max_actors or p.min_actors for p in plans.values())
        ds = read_dataset(cfg, {i: todo[i] for i in streaming}, actors, retries)
        finish = functools.partial(stage_batch, out_url=cfg.out_url, preset_ids=_preset_ids(cfg))
        # The last pool writes its results to staging itself (no extra process, no extra hop of
        # every image) unless it holds GPUs, which should not wait on storage.
        fold = not plans[groups[-1][-1]].num_gpus
        for group in groups:
            plan, opt = plans[group[-1]], cfg.options(group[-1])
            ds = ds.map_batches(
                StageRunner,
                fn_constructor_kwargs={"stages": _stage_args(cfg, group), "preset": cfg.preset,
                                       "torch_threads": plan.torch_threads,
                                       "finish": finish if fold and group is groups[-1] else None},
                batch_size=opt.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
                num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None,
                **({"memory": int(opt.memory_gib * 2**30)} if opt.memory_gib else {}),
            )
        if not fold:
            ds = ds.map_batches(finish, batch_format="numpy", batch_size=cfg.options(groups[-1][-1]).batch_size,
                                num_cpus=pools.TASK_CPUS, **retries)
        remaining = {i: len(todo[i]) for i in streaming}
        for row in ds.iter_rows():
            i, n = int(row["shard"]), int(row["n"])
            ran(json.loads(row["timings"]), json.loads(row["workers"]), n)
            remaining[i] -= n
            if remaining[i] <= 0 and i not in futures:
                futures[i] = assemble.remote(cfg.out_url, by_index[i])
        for i in streaming:  # a retried batch may have been counted twice: make sure every shard is assembled
            if i not in futures:
                futures[i] = assemble.remote(cfg.out_url, by_index[i])
    for i, fut in futures.items():
        try:
            counts = ray.get(fut)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a shard that cannot be assembled is a failed shard
            failed(by_index[i], describe(getattr(exc, "cause", None) or exc))
            continue
        done(by_index[i], counts)


def read_parts(cfg: TripletsConfig, todo: dict[int, set[str]], workers: int) -> list[dict[str, Any]]:
    """The reads that feed ``workers`` workers: one per shard, or, when there are fewer shards than
    workers, up to ``ceil(workers / shards)`` parts per shard (never more parts than it has
    batches). Part ``j`` of ``k`` keeps every k-th row still to do, so a one-shard job gives every
    worker work; each part reads the shard's tar again, which is bounded by the pool size and
    vanishes once shards outnumber workers. Batching does not change the bytes (assembly restores
    the ingest order; seeds are per key)."""
    groups = pools.pool_groups(cfg.stage_names(), _model_free())
    rows = min(cfg.options(g[-1]).batch_size for g in groups)
    per_shard = -(-max(1, workers) // max(1, len(todo)))
    items = []
    for i, keys in todo.items():
        parts = max(1, min(per_shard, -(-len(keys) // rows)))
        skip = json.dumps(sorted(staging.staged_rows(cfg.out_url, i)))
        items += [{"shard": i, "skip": skip, "part": j, "parts": parts} for j in range(parts)]
    return items


def read_dataset(cfg: TripletsConfig, todo: dict[int, set[str]], actors: int, retries: dict[str, Any] | None = None):
    """The rows still to do of the shards in ``todo`` as a Ray Data stream, one block per
    :func:`read_parts` item (a block goes to one actor)."""
    import ray

    items = read_parts(cfg, todo, actors)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Ray Data retries tasks and restarts actors lost with a node (bounded here); a sample
    # reaches staging at most once per successful batch, and staging tolerates repeats.
    return ds.flat_map(_flat_read, fn_kwargs={"ingest_url": cfg.ingest_url}, num_cpus=pools.TASK_CPUS,
                       **(retries or {}))


def _assemble(out_url: str, shard: Shard) -> dict[str, int]:
    return staging.assemble_shard(out_url, shard.index, shard.inputs, input_hash=shard.input_hash)


def _runners(cfg: TripletsConfig) -> list[StageRunner]:
    """Every stage group as in the Ray actors (the same groups and torch threads, so every executor
    writes the same bytes), the last one staging its results."""
    groups = pools.pool_groups(cfg.stage_names(), _model_free())
    finish = functools.partial(stage_batch, out_url=cfg.out_url, preset_ids=_preset_ids(cfg))
    return [StageRunner(_stage_args(cfg, g), cfg.preset, torch_threads=pools.torch_threads(cfg.options(g[-1])),
                        finish=finish if g is groups[-1] else None) for g in groups]


_WORKER_RUNNERS: dict[str, list[StageRunner]] = {}  # in a pool worker: the models, loaded once per config


def run_part(cfg: TripletsConfig, item: dict[str, Any], runners: list[StageRunner] | None = None
             ) -> dict[str, Any]:
    """One :func:`read_parts` item through every stage, batch by batch, into staging. Returns the
    rows staged, the stage seconds and which process ran each stage."""
    if runners is None:
        key = json.dumps([cfg.ingest_url, cfg.out_url, cfg.identity(),
                          {k: repr(v) for k, v in sorted(cfg.stages.items())}], sort_keys=True)
        if key not in _WORKER_RUNNERS:
            _WORKER_RUNNERS.clear()
            _WORKER_RUNNERS[key] = _runners(cfg)
        runners = _WORKER_RUNNERS[key]
    bs = cfg.options("inpaint").batch_size
    timings: Counter = Counter()
    workers: dict[str, set[str]] = defaultdict(set)
    staged, buf = 0, []
    for row in _flat_read(item, cfg.ingest_url):
        buf.append(row)
        if len(buf) == bs:
            staged += _local_batch(buf, runners, timings, workers)
            buf = []
    if buf:
        staged += _local_batch(buf, runners, timings, workers)
    return {"staged": staged, "timings": dict(timings), "workers": {k: sorted(v) for k, v in workers.items()}}


def _local_batch(rows: list[dict[str, Any]], runners: list[StageRunner], timings: Counter,
                 workers: dict[str, set[str]]) -> int:
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["shard"] = batch["shard"].astype(np.int64)
    for runner in runners:
        batch = runner(batch)
    for t, w in zip(batch["timings"], batch["workers"]):
        timings.update(json.loads(t))
        for stage, ids in json.loads(w).items():
            workers[stage].update(ids)
    return int(np.sum(batch["n"]))


def _assemble_or_fail(cfg: TripletsConfig, shard: Shard, done: Callable, failed: Callable) -> None:
    try:
        counts = _assemble(cfg.out_url, shard)
    except PROPAGATE:
        raise
    except Exception as exc:  # noqa: BLE001 - a shard that cannot be assembled is a failed shard
        failed(shard, describe(exc))
        return
    done(shard, counts)


def _run_local(cfg: TripletsConfig, pending: list[Shard], todo: dict[int, set[str]], ran: Callable,
               done: Callable, failed: Callable) -> None:
    """Every stage in this process, one shard after another (debugging, memory://, the inline bound)."""
    runners = _runners(cfg)
    for shard in pending:
        if todo[shard.index]:
            try:
                for item in read_parts(cfg, {shard.index: todo[shard.index]}, 1):
                    out = run_part(cfg, item, runners)
                    ran(out["timings"], out["workers"], out["staged"])
            except PROPAGATE:
                raise
            except Exception as exc:  # noqa: BLE001 - this shard failed; the others still run
                failed(shard, describe(exc))
                continue
        _assemble_or_fail(cfg, shard, done, failed)


@dataclass(frozen=True)
class _Part:
    """One :func:`read_parts` item as a task of the process pool (``index``: its shard)."""

    index: int
    item: dict[str, Any]


@dataclass
class _PartsJob:
    """What the process pool's workers run: :func:`run_part` per item (the models load once per worker)."""

    cfg: TripletsConfig
    kind: str = "build-triplets"

    def process_shard(self, part: _Part) -> dict[str, Any]:
        return run_part(self.cfg, part.item)


def pool_workers(cfg: TripletsConfig, opts: RunOptions) -> int:
    """Worker processes of the ``processes`` executor: ``opts.workers``, else as many as the CPUs
    hold at the stages' torch threads (one each by default) and the memory at the preset's models."""
    if opts.workers:
        return opts.workers
    groups = pools.pool_groups(cfg.stage_names(), _model_free())
    threads = max(pools.torch_threads(cfg.options(g[-1])) for g in groups)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = None
    return pools.pool_workers(os.cpu_count() or 1, threads, cfg.preset, memory)


def _run_in_processes(cfg: TripletsConfig, pending: list[Shard], todo: dict[int, set[str]], ran: Callable,
                      opts: RunOptions, done: Callable, failed: Callable) -> None:
    """Every stage in each of a pool of worker processes, on parts of shards; a shard is assembled
    here once all its parts are staged. A part is retried up to ``max_attempts`` times (a dead or
    timed-out worker is replaced); a part that still fails fails its shard."""
    from tasks.process_pool import run_in_processes

    workers = pool_workers(cfg, opts)
    by_index = {s.index: s for s in pending}
    for s in pending:  # staged already (a resumed run): nothing to compute
        if not todo[s.index]:
            _assemble_or_fail(cfg, s, done, failed)
    parts = [_Part(it["shard"], it) for it in read_parts(cfg, {i: k for i, k in todo.items() if k}, workers)]
    left = Counter(p.index for p in parts)
    gave_up: set[int] = set()

    def part_done(part: _Part, row: dict[str, Any]) -> None:
        ran(row["timings"], row["workers"], row["staged"])
        left[part.index] -= 1
        if left[part.index] == 0 and part.index not in gave_up:
            _assemble_or_fail(cfg, by_index[part.index], done, failed)

    def part_failed(part: _Part, error: str) -> None:
        if part.index not in gave_up:
            gave_up.add(part.index)
            failed(by_index[part.index], error)

    if parts:
        run_in_processes(_PartsJob(cfg), parts, replace(opts, workers=workers), part_done, part_failed, log)


def _remove_staging(out_url: str) -> None:
    """Every shard is assembled: drop what is left in staging (parts a retried task wrote again
    after its shard was assembled)."""
    fs, root = storage.get_fs(storage.join(out_url, "_staging"))
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------------------------ finish


def finalize(cfg: TripletsConfig, ingest_manifest: dict, report: RunReport, stage_seconds: dict[str, float]
             ) -> TripletsResult:
    """Manifest and contact sheet for the whole output (atomic writes); the runner has written
    rejects.parquet. Staging is removed once every shard is assembled."""
    from tasks.triplets.preview import write_contact_sheet

    shards = [{"tar": f"shards/{shard_name(i)}.tar", "triplets": ok, "rejects": rej,
               "duplicates": report.shard_duplicates.get(i, 0)}
              for i, ok, rej in report.shard_counts]
    reasons = report.reasons
    urls = [s.tar_url for s in report.committed]
    preview = write_contact_sheet(urls, storage.join(cfg.out_url, "preview.png"))
    report.write_manifest({
        "kind": "cnc-triplets",
        "counts": {"sources": report.inputs, "triplets": report.samples, "rejects": len(report.rejects),
                   "duplicates": report.duplicates, "rejects_by_reason": dict(sorted(reasons.items()))},
        "ingest": {"url": cfg.ingest_url, "counts": ingest_manifest["counts"], "config": ingest_manifest["config"]},
        "config": cfg.identity(),
        "models": _preset_ids(cfg),
        "files": {**{v: k for k, v in OUTPUT_FILES.items()}, "txt": "caption", "json": "metadata"},
        "versions": versions(),
        "shards": shards,
    })
    if not report.failed:
        _remove_staging(cfg.out_url)
    digest = hashlib.sha256(storage.read_bytes(storage.join(cfg.out_url, "manifest.json"))).hexdigest()
    return TripletsResult(cfg.out_url, report.inputs, report.samples, len(report.rejects), reasons, urls,
                          dict(defaultdict(float, stage_seconds)), preview, shards_written=len(report.written),
                          manifest_sha256=digest, num_duplicates=report.duplicates)
