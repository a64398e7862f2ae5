"""The ``processes`` executor of the shard runner: one machine, a pool of worker processes, no Ray.

Like img2dataset's multiprocessing distributor, but each worker is its own long-lived process with
one shard at a time, so the parent always knows which shard a worker holds: a worker that dies
(a segfault, the OOM killer) or runs past the per-shard timeout is killed and restarted, and only
its own shard is charged an attempt. Workers are *spawned* (no fork of a parent that holds
threads) and import only what the job's module imports: ingest workers load neither torch nor Ray.
On Linux a worker dies with the process that started it, even when that one is killed outright
(a cancelled flow run, the OOM killer), so no worker goes on computing a shard for nobody.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from tasks.run_options import RunOptions


def _die_with(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); if the parent
    is already gone, exit now."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:
        os._exit(1)


def _worker(conn: Connection, parent: int | None = None) -> None:
    """Run (job, shard) requests until told to stop; answer each with ("ok", row) or ("error", text)."""
    if parent is not None:
        _die_with(parent)
    from tasks.shard_job import _attempt, describe

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        job, shard = msg
        conn.send(("started", None))  # the timeout counts from here, not from the worker's start-up
        try:
            row = _attempt(job, shard)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which retries or records it
            conn.send(("error", describe(exc)))
            if not isinstance(exc, Exception):
                raise
            continue
        conn.send(("ok", row))


class _Slot:
    """One worker process and the shard it holds."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.proc: Any = None
        self.conn: Connection | None = None
        self.task: tuple[Any, int, float] | None = None  # (shard, attempt, started)

    def submit(self, job: Any, shard: Any, attempt: int) -> None:
        if self.proc is None or not self.proc.is_alive():
            parent, child = self.ctx.Pipe()
            self.proc = self.ctx.Process(target=_worker, args=(child, os.getpid()), daemon=True,
                                         name="cnc-shard-worker")
            self.proc.start()
            child.close()
            self.conn = parent
        assert self.conn is not None
        self.conn.send((job, shard))
        self.task = (shard, attempt, float("inf"))  # not started yet: no timeout until it says so

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive() and self.conn is not None:
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (OSError, ValueError):
                pass
        self.kill()


def run_in_processes(job: Any, pending: list[Any], opts: RunOptions, done: Callable, failed: Callable,
                     log: Any) -> None:
    """Run ``job.process_shard`` for each pending shard on ``opts.workers`` processes (default: the
    CPU count), at most ``max_attempts`` tries each, each within ``shard_timeout_s``."""
    ctx = mp.get_context("spawn")
    slots = [_Slot(ctx) for _ in range(max(1, min(opts.workers or os.cpu_count() or 1, len(pending))))]
    queue: deque[tuple[Any, int]] = deque((s, 1) for s in pending)

    def retry_or_fail(shard: Any, attempt: int, error: str) -> None:
        log.warning("%s: shard %d attempt %d failed: %s", job.kind, shard.index, attempt, error)
        if attempt < opts.max_attempts:
            queue.append((shard, attempt + 1))
        else:
            failed(shard, error)

    try:
        while queue or any(s.task for s in slots):
            for slot in slots:
                if slot.task is None and queue:
                    slot.submit(job, *queue.popleft())
            busy = [s for s in slots if s.task]
            handles = [h for s in busy for h in (s.conn, s.proc.sentinel)]
            ready = set(wait(handles, timeout=1.0 if opts.shard_timeout_s else 5.0))
            now = time.monotonic()
            for slot in busy:
                shard, attempt, started = slot.task  # type: ignore[misc]
                if slot.conn in ready:
                    try:
                        status, payload = slot.conn.recv()  # type: ignore[union-attr]
                    except (EOFError, OSError):
                        status, payload = "died", None
                    if status == "started":
                        slot.task = (shard, attempt, now)
                        continue
                    if status == "ok":
                        slot.task = None
                        done(shard, {**payload, "attempts": attempt})
                        continue
                    if status == "error":
                        slot.task = None
                        retry_or_fail(shard, attempt, payload)
                        continue
                if slot.conn in ready or slot.proc.sentinel in ready:
                    slot.proc.join(5)  # the pipe can close a moment before the exit is reaped
                    code = slot.proc.exitcode
                    slot.kill()
                    slot.task = None
                    retry_or_fail(shard, attempt, f"worker process died (exit code {code})")
                elif opts.shard_timeout_s and started != float("inf") and now - started > opts.shard_timeout_s:
                    slot.kill()
                    slot.task = None
                    retry_or_fail(shard, attempt, f"timed out after {opts.shard_timeout_s:g} s")
    finally:
        for slot in slots:
            slot.stop()
