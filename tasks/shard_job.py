"""One runner for every exactly-once, resumable shard job (ingest, build-triplets, and the next ones).

What a job supplies (subclass :class:`ShardJob`; the object must pickle, it travels to workers):

- ``kind``, ``out_url`` and :meth:`ShardJob.identity` (the config that decides the output bytes;
  a rerun with another identity is refused);
- :meth:`ShardJob.plan`: the shards, in order, each made by :meth:`ShardJob.shard` from a JSON-able
  description of its inputs (what it reads) and its input count;
- :meth:`ShardJob.process_shard`: write one shard, on a worker, with ``shard.writer()`` (a
  :class:`tasks.shards.ShardWriter` that records the input hash); return its counts. Bad *inputs*
  become reject rows; an exception fails the *shard* (it is retried, then recorded as failed);
- :meth:`ShardJob.finalize`: build the job's manifest and result from a :class:`RunReport`
  (``report.manifest(...)`` adds the runner's fields and writes it);
- optionally :meth:`ShardJob.begin`, told before the plan whether the output was finished and
  what the options are: a job that can grow (ingest) opens a new *segment* there for ``extend``.
  A streaming job whose shards are not independent tasks (build-triplets) overrides
  :meth:`ShardJob.run_pending` instead of relying on :meth:`ShardJob.process_shard`.

What :func:`run_shard_job` guarantees, in order:

1. the output's exclusive lease (:mod:`tasks.lease`): a second live run is refused, an expired
   lease is taken over; leftover ``.*.tmp-*`` files of dead runs are swept;
2. the claim: ``_config.json`` is written on the first run; a different config is refused; an
   unfinished output needs ``resume=True`` (and is refused with ``extend=True``: finish it first);
3. the plan; committed shards (their index exists) are skipped after checking that their stored
   input hash matches the plan (a changed source is refused, never silently mixed). New shards
   in a finished output of an ``extendable`` job are refused unless ``extend`` (or ``resume``) is set;
4. pending shards run on the chosen executor (:func:`choose_executor`: ``ray`` plain Ray tasks,
   ``processes`` a pool of worker processes on this machine, ``local`` in order in this process;
   all write the same bytes), at most ``max_attempts`` times each, each attempt within
   ``shard_timeout_s`` (ray and processes); a shard that
   still fails is recorded in the manifest's ``failed_shards`` and the run raises
   :class:`ShardJobFailed` naming it, after finishing every other shard;
5. the finish: ``rejects.parquet`` from every committed index, then the job's manifest; a run
   whose rejects are all its inputs (or more than ``max_reject_share``) raises :class:`TooManyRejects`.
   Index rows count as samples (``ok``), rejects or duplicates (``duplicate``: bytes already in the
   output); a ``retryable`` reject followed by a later shard's row for the same source id (the
   input was tried again) is replaced by that row, so ``samples + rejects + duplicates == inputs``.

Every shard is committed atomically by its writer, so any crash costs at most a retry of the
shards in flight, and the same inputs and config always give the same bytes on every executor.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tasks import storage
from tasks.lease import Lease, OutputBusy
from tasks.run_options import EXECUTORS, RunOptions
from tasks.shards import DUPLICATE, OK, ShardWriter, read_index, read_input_hash, shard_urls

log = logging.getLogger(__name__)

CONFIG_FILE = "_config.json"
TEMP_MARK = ".tmp-"

__all__ = ["EXECUTORS", "PROPAGATE", "OutputBusy", "OutputConflict", "RunOptions", "RunReport", "Shard", "ShardJob",
           "ShardJobFailed", "TooManyRejects", "describe", "is_transient", "run_shard_job"]


# Never turned into a reject: the process is out of memory, or the code (not the input) is wrong.
PROPAGATE: tuple[type[BaseException], ...] = (MemoryError, NameError, AttributeError, ImportError, AssertionError,
                                               RecursionError, NotImplementedError)

_TRANSIENT_NAMES = ("Timeout", "Throttl", "SlowDown", "ServiceUnavailable", "ServerDisconnected", "ClientOSError",
                    "ConnectionReset", "ConnectionError", "EndpointConnectionError", "InternalError",
                    "RequestTimeTooSkewed", "BrokenPipe")
_TRANSIENT_ERRNOS = {4, 5, 11, 32, 54, 60, 70, 103, 104, 110, 111, 112, 113, 116}  # EINTR, EIO, EAGAIN, EPIPE...


def is_transient(exc: BaseException) -> bool:
    """Whether an I/O error may go away on a retry (network, throttling, a 5xx, a stale handle):
    such an error fails the shard, to be retried, instead of becoming a permanent reject."""
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        name = type(e).__name__
        if any(t in name for t in _TRANSIENT_NAMES):
            return True
        status = getattr(e, "status", None) or getattr(e, "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        response = getattr(e, "response", None)
        code = (response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) \
            else None
        if isinstance(code, int) and (code >= 500 or code == 429):
            return True
        text = str(e)
        if any(f"{c} " in text or f"({c})" in text for c in ("503", "500", "502", "504")) and "Error" in text:
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def describe(exc: BaseException) -> str:
    """An exception as one line for a reject's ``detail``: its type and message."""
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


class OutputConflict(RuntimeError):
    """The output holds a different run, an unfinished one and no resume, or shards of other inputs."""


class ShardJobFailed(RuntimeError):
    """Some shards could not be done; the manifest lists them under ``failed_shards``."""

    def __init__(self, message: str, result: Any = None, failed: dict[int, str] | None = None):
        super().__init__(message)
        self.result = result
        self.failed = failed or {}


class TooManyRejects(ShardJobFailed):
    """Every input (or more than the allowed share) was rejected: the output is complete but useless."""


@dataclass(frozen=True)
class Shard:
    """One planned shard: its place, what it reads (``inputs``, JSON-able) and how many inputs."""

    index: int
    inputs: Any
    size: int
    input_hash: str
    shards_url: str

    @property
    def tar_url(self) -> str:
        return shard_urls(self.shards_url, self.index)[0]

    @property
    def index_url(self) -> str:
        return shard_urls(self.shards_url, self.index)[1]

    def writer(self, extra_columns: dict | None = None) -> ShardWriter:
        """The shard's writer: atomic tar, then the index (commit marker) with the input hash."""
        return ShardWriter(self.tar_url, self.index_url, extra_columns, input_hash=self.input_hash)


def input_hash(inputs: Any) -> str:
    """A stable hash of a shard's input description."""
    data = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


class ShardJob:
    """Base class of a shard job; see the module docstring for what a subclass supplies."""

    kind: str = "shard-job"
    out_url: str = ""
    unit: str = "item"
    executors: tuple[str, ...] = ("ray", "processes", "local")  # what the job can run on
    extendable: bool = False  # takes new inputs with ``extend``; a finished output refuses them otherwise

    def in_process_only(self) -> bool:
        """Whether the job reads or writes ``memory://`` (visible in this process only)."""
        return self.out_url.startswith("memory://")

    @property
    def shards_url(self) -> str:
        return storage.join(self.out_url, "shards")

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self) -> list[Shard]:
        raise NotImplementedError

    def shard(self, index: int, inputs: Any, size: int) -> Shard:
        """A planned shard; ``inputs`` describe what it reads, exactly (they are hashed)."""
        return Shard(index, inputs, size, input_hash(inputs), self.shards_url)

    def process_shard(self, shard: Shard) -> dict[str, int]:
        raise NotImplementedError

    def parallel_units(self, pending: list[Shard], opts: RunOptions) -> int:
        """How many pieces of work the pending shards can be split into among ``opts.workers``
        (``auto`` starts no worker for one). The default: one per shard, at most one per worker."""
        return min(len(pending), opts.workers) if opts.workers else len(pending)

    def begin(self, opts: RunOptions, finished: bool) -> None:
        """Called under the lease, after the claim and before :meth:`plan`; ``finished`` says whether
        the output held a finished run. The default does nothing."""

    def run_pending(self, pending: list[Shard], opts: RunOptions,
                    done: Callable[[Shard, dict[str, Any]], None], failed: Callable[[Shard, str], None]) -> None:
        """Run the pending shards: call ``done`` after each commit, ``failed`` for one given up on.
        The default runs :meth:`process_shard` per shard on ``opts.executor``."""
        if opts.executor == "ray":
            _run_ray(self, pending, opts, done, failed)
        elif opts.executor == "processes":
            from tasks.process_pool import run_in_processes

            run_in_processes(self, pending, opts, done, failed, log)
        else:
            _run_local(self, pending, opts, done, failed)

    def finalize(self, report: RunReport) -> Any:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- the report


@dataclass
class RunReport:
    """What the runner knows when the shards are done, for the job's :meth:`ShardJob.finalize`."""

    job: ShardJob
    shards: list[Shard]
    executor: str = ""
    written: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)  # source_id, reason, shard, detail, retryable
    shard_counts: list[tuple[int, int, int]] = field(default_factory=list)  # (shard, samples, rejects)
    shard_duplicates: dict[int, int] = field(default_factory=dict)  # shard -> duplicate rows
    retried: int = 0  # retryable rejects replaced by a later shard's row for the same input

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects))

    @property
    def samples(self) -> int:
        return sum(s for _, s, _ in self.shard_counts)

    @property
    def duplicates(self) -> int:
        return sum(self.shard_duplicates.values())

    @property
    def inputs(self) -> int:
        """Inputs of the committed shards (a failed shard's inputs are in ``failed_shards``)."""
        return self.samples + len(self.rejects) + self.duplicates

    @property
    def inputs_run(self) -> int:
        """Inputs of the shards this run wrote (what its throughput counts; a resumed or re-run job
        skips the rest)."""
        written = set(self.written)
        return sum(s.size for s in self.shards if s.index in written)

    @property
    def committed(self) -> list[Shard]:
        return [s for s in self.shards if s.index not in self.failed]

    def failed_shards(self) -> list[dict[str, Any]]:
        by_index = {s.index: s for s in self.shards}
        return [{"shard": i, "inputs": by_index[i].size, "error": e} for i, e in sorted(self.failed.items())]

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Add the runner's fields (``failed_shards``) and write ``manifest.json`` atomically."""
        manifest = {**manifest, "failed_shards": self.failed_shards()}
        storage.write_json(storage.join(self.job.out_url, "manifest.json"), manifest)
        return manifest

    def _gather(self) -> None:
        """Read every committed index once, shard by shard (only the retryable rejects' ids are
        held beyond a shard)."""
        rejects: list[dict[str, Any] | None] = []
        retryable: dict[str, tuple[int, int]] = {}  # source id -> (shard, position in rejects)
        for s in self.committed:
            table = read_index(s.index_url)
            rows = table.select([c for c in ("source_id", "status", "reason", "detail", "retryable")
                                 if c in table.column_names]).to_pylist()
            ok = dup = rej = 0
            for r in rows:
                earlier = retryable.get(r["source_id"])
                if earlier is not None and earlier[0] < s.index:  # tried again: the later row counts
                    rejects[earlier[1]] = None
                    del retryable[r["source_id"]]
                    self.retried += 1
                if r["status"] == OK:
                    ok += 1
                elif r["status"] == DUPLICATE:
                    dup += 1
                else:
                    rej += 1
                    if r.get("retryable"):
                        retryable[r["source_id"]] = (s.index, len(rejects))
                    rejects.append({"source_id": r["source_id"], "reason": r["reason"], "shard": s.index,
                                    "detail": r.get("detail") or "", "retryable": bool(r.get("retryable"))})
            self.shard_counts.append((s.index, ok, rej))
            if dup:
                self.shard_duplicates[s.index] = dup
        self.rejects += [r for r in rejects if r is not None]

    def _write_rejects(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("source_id", pa.string()), ("reason", pa.string()), ("shard", pa.int32()),
                            ("detail", pa.string()), ("retryable", pa.bool_())])
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rejects, schema=schema), buf, compression="zstd")
        storage.write_bytes(storage.join(self.job.out_url, "rejects.parquet"), buf.getvalue())


# ---------------------------------------------------------------------------------- the driver


def choose_executor(requested: str, job: ShardJob, num_pending: int | None = None) -> tuple[str, str]:
    """(executor, why): ``requested`` unless it is ``auto``. Auto: Ray when a cluster is given
    (``RAY_ADDRESS``, or Ray already started in this process) or the job needs Ray's pools; else
    this process for memory:// URLs or a single piece of work (``num_pending``:
    :meth:`ShardJob.parallel_units`); else a process pool, which starts in well under a second where a
    local Ray costs ~10 CPU-seconds (docs/benchmarks.md)."""
    if requested not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {requested!r}")
    if requested != "auto":
        if requested not in job.executors:
            raise ValueError(f"{job.kind} runs on {', '.join(job.executors)}, not {requested!r}")
        return requested, "asked for"
    if job.in_process_only():
        return "local", "memory:// URLs live in this process"
    if os.environ.get("RAY_ADDRESS") or _ray_running():
        return "ray", "RAY_ADDRESS is set" if os.environ.get("RAY_ADDRESS") else "Ray is running in this process"
    if "processes" not in job.executors:
        return "ray", f"{job.kind} with these options runs its pools on Ray"
    if num_pending is not None and num_pending <= 1 or (os.cpu_count() or 1) == 1:
        return "local", "too little work to share among workers (or one core): this process"
    return "processes", "one machine and no RAY_ADDRESS: a process pool (use --executor ray for Ray)"


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_shard_job(job: ShardJob, opts: RunOptions | None = None) -> Any:
    """Run ``job`` exactly once per shard (see the module docstring); returns ``job.finalize``'s result."""
    opts = opts or RunOptions()
    if opts.executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {opts.executor!r}")
    if opts.max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {opts.max_attempts}")
    storage.makedirs(job.out_url)
    lease = Lease(job.out_url, opts.lease_seconds).acquire()
    try:
        sweep_temp_files(job.out_url)
        claim_output(job, opts.resume, opts.extend)
        finished = is_finished(job.out_url)
        job.begin(opts, finished)
        shards = job.plan()
        pending = [s for s in shards if not _committed(s)]
        if job.extendable and finished and pending and not (opts.extend or opts.resume):
            raise OutputConflict(f"{job.out_url} holds a finished run and its input has {len(pending)} new "
                                 f"shard(s); pass --extend to append them")
        executor, why = choose_executor(opts.executor, job, job.parallel_units(pending, opts))
        opts = replace(opts, executor=executor)
        log.info("%s: %d of %d shards to do on %s (%s)", job.kind, len(pending), len(shards), executor, why)
        if opts.announce and pending:
            opts.announce(f"{job.kind}: executor {executor} ({why})")
        report = RunReport(job, shards, executor=executor)
        bar = _progress_bar(sum(s.size for s in pending), opts.progress, job.kind, job.unit)

        def done(shard: Shard, row: dict[str, Any]) -> None:
            lease.check()
            report.written.append(shard.index)
            bar.update(shard.size)
            if opts.on_shard:
                opts.on_shard({"shard": shard.index, **row})

        def gave_up(shard: Shard, error: str) -> None:
            log.error("%s: shard %d failed: %s", job.kind, shard.index, error)
            report.failed[shard.index] = error
            bar.update(shard.size)

        if pending:
            job.run_pending(pending, opts, done, gave_up)
        bar.close()
        lease.check()
        report._gather()
        report._write_rejects()
        result = job.finalize(report)
    finally:
        lease.release()
    if report.failed:
        names = ", ".join(f"shard {i} ({e})" for i, e in sorted(report.failed.items()))
        raise ShardJobFailed(f"{len(report.failed)} of {len(shards)} shards failed: {names}; rerun with --resume "
                             f"to retry them", result, dict(report.failed))
    _check_reject_share(report, opts, result)
    return result


def _check_reject_share(report: RunReport, opts: RunOptions, result: Any) -> None:
    inputs, rejected = report.inputs, len(report.rejects)
    if not inputs:
        return
    share = rejected / inputs
    too_many = rejected == inputs if opts.max_reject_share is None else share > opts.max_reject_share
    if too_many:
        top = ", ".join(f"{r} ({n})" for r, n in sorted(report.reasons.items(), key=lambda kv: -kv[1])[:3])
        raise TooManyRejects(f"{rejected} of {inputs} inputs were rejected ({share:.0%}): {top}", result)


def claim_output(job: ShardJob, resume: bool, extend: bool = False) -> None:
    """Write the job's identity on a first run; refuse another config, or an unfinished run without
    resume (an unfinished run is finished with resume before it is extended)."""
    config_url = storage.join(job.out_url, CONFIG_FILE)
    wanted = json.loads(json.dumps(job.identity(), sort_keys=True, default=str))
    if storage.exists(config_url):
        if storage.read_json(config_url) != wanted:
            raise OutputConflict(f"{job.out_url} holds a run with a different config; use another --out")
        if not is_finished(job.out_url) and not resume:
            also = " before extending it" if extend else ""
            raise OutputConflict(f"{job.out_url} holds an unfinished run; pass --resume to finish it{also}")
        return
    storage.write_json(config_url, wanted)


def is_finished(out_url: str) -> bool:
    """A manifest exists and names no failed shard."""
    url = storage.join(out_url, "manifest.json")
    return storage.exists(url) and not storage.read_json(url).get("failed_shards")


def _committed(shard: Shard) -> bool:
    if not storage.exists(shard.index_url):
        return False
    found = read_input_hash(shard.index_url)
    if found is None:  # committed before input hashes existed: nothing to compare
        return True
    if found != shard.input_hash:
        raise OutputConflict(
            f"shard {shard.index} in {shard.shards_url} was made from other inputs than the source lists now "
            f"(the source changed since that run); write to a new --out, or add inputs with --extend "
            f"after a finished run")
    return True


def sweep_temp_files(out_url: str) -> int:
    """Remove ``.<name>.tmp-<id>`` files that dead runs left (only ever called under the lease)."""
    fs, root = storage.get_fs(out_url)
    if storage.protocol_of(fs) not in ("file", "local"):
        return 0  # object stores publish whole objects: no temporary siblings
    removed = 0
    for dirpath, _dirs, files in fs.walk(root):
        for name in files:
            if name.startswith(".") and TEMP_MARK in name:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(posixpath.join(dirpath, name))
                    removed += 1
    if removed:
        log.info("swept %d temporary files of earlier runs under %s", removed, out_url)
    return removed


# ---------------------------------------------------------------------------------- executors


def _attempt(job: ShardJob, shard: Shard) -> dict[str, Any]:
    t0 = time.perf_counter()
    counts = job.process_shard(shard)
    return {**counts, "seconds": time.perf_counter() - t0}


def _run_local(job: ShardJob, pending: list[Shard], opts: RunOptions, done: Callable, failed: Callable) -> None:
    """One shard after another in this process; each retried up to ``max_attempts`` times."""
    for shard in pending:
        for attempt in range(1, opts.max_attempts + 1):
            try:
                row = _attempt(job, shard)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - the shard fails, the run goes on (then reports it)
                log.warning("%s: shard %d attempt %d failed: %s", job.kind, shard.index, attempt, describe(exc))
                if attempt == opts.max_attempts:
                    failed(shard, describe(exc))
                continue
            done(shard, {**row, "attempts": attempt})
            break


def _run_ray(job: ShardJob, pending: list[Shard], opts: RunOptions, done: Callable, failed: Callable) -> None:
    """Plain Ray tasks, as many in flight as the cluster has room for; a task that raises, whose
    worker or node dies, or that runs past the timeout is resubmitted until ``max_attempts``."""
    import ray

    from tasks.ray_runtime import init_ray

    init_ray()
    # Ray's own retries are off: every attempt is counted here, so a poison shard ends.
    task = ray.remote(_attempt).options(num_cpus=opts.num_cpus, max_retries=0, retry_exceptions=False)
    job_ref = ray.put(job)
    queue: deque[tuple[Shard, int]] = deque((s, 1) for s in pending)
    running: dict[Any, tuple[Shard, int, float]] = {}

    def room() -> int:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        return max(1, int(cpus // max(opts.num_cpus, 1e-3)))

    def retry_or_fail(shard: Shard, attempt: int, error: str) -> None:
        log.warning("%s: shard %d attempt %d failed: %s", job.kind, shard.index, attempt, error)
        if attempt < opts.max_attempts:
            queue.append((shard, attempt + 1))
        else:
            failed(shard, error)

    while queue or running:
        limit = room()
        while queue and len(running) < limit:
            shard, attempt = queue.popleft()
            running[task.remote(job_ref, shard)] = (shard, attempt, time.monotonic())
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0 if opts.shard_timeout_s else 5.0)
        for ref in ready:
            shard, attempt, _t0 = running.pop(ref)
            try:
                row = ray.get(ref)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, NodeDiedError...
                cause = getattr(exc, "cause", None) or exc
                retry_or_fail(shard, attempt, describe(cause))
                continue
            done(shard, {**row, "attempts": attempt})
        if opts.shard_timeout_s:
            now = time.monotonic()
            for ref, (shard, attempt, t0) in list(running.items()):
                if now - t0 > opts.shard_timeout_s:
                    ray.cancel(ref, force=True)
                    running.pop(ref)
                    retry_or_fail(shard, attempt, f"timed out after {opts.shard_timeout_s:g} s")


def _progress_bar(total: int, enabled: bool, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, desc=desc)
