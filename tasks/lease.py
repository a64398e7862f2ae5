"""An exclusive, expiring lease on an output URL, so two runs never write one output at once.

The lease is a folder ``_lease/`` of numbered generation files (``000001.json``, ...), each
``{"run_id", "host", "pid", "expires"}``. The highest generation is the lease. Taking it means
creating the next generation *if absent* (``O_EXCL`` on local disks, ``If-None-Match: *`` on S3,
the same on ``memory://``), so of two runs racing for a free or expired lease exactly one wins.
A live lease (``expires`` in the future) is refused with :class:`OutputBusy`; an expired one (its
run died) is taken over, and so is one whose process is gone from this host (a killed run on a
laptop need not wait for the expiry). The holder renews its own generation in a background thread; a holder
that finds a newer generation has lost the lease and stops renewing. Releasing removes the
folder, so a finished output holds no trace of the lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

from tasks import storage
from tasks.run_options import DEFAULT_LEASE_SECONDS

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"


class OutputBusy(RuntimeError):
    """Another live run holds the output's lease."""


def _create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` at ``url`` only if nothing is there. False when something already was."""
    fs, path = storage.get_fs(url)
    if storage.protocol_of(fs) in ("file", "local"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs: a conditional PUT; memory: checked in-process
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs maps 412 Precondition Failed to an OSError subclass on some versions
        if "PreconditionFailed" in repr(exc) or "412" in str(exc):
            return False
        raise
    return True


def _dead_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed, OOM): no need to wait for expiry."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    """The lease of one run on ``out_url``; use :func:`acquire` to get one."""

    def __init__(self, out_url: str, seconds: float, run_id: str | None = None):
        self.out_url = out_url
        self.seconds = float(seconds)
        self.run_id = run_id or uuid.uuid4().hex
        self.generation = 0
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def folder(self) -> str:
        return storage.join(self.out_url, LEASE_DIR)

    def _url(self, generation: int) -> str:
        return storage.join(self.folder, f"{generation:06d}.json")

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}, sort_keys=True).encode()

    def _latest(self) -> tuple[int, dict[str, Any] | None]:
        fs, path = storage.get_fs(self.folder)
        try:
            names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return 0, None
        gens = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
        if not gens:
            return 0, None
        try:
            return gens[-1], storage.read_json(self._url(gens[-1]))
        except (FileNotFoundError, ValueError):  # being written or removed right now: treat as live
            return gens[-1], {"run_id": "?", "expires": time.time() + self.seconds}

    def acquire(self) -> Lease:
        """Take the lease or raise :class:`OutputBusy` naming the run that holds it."""
        for _ in range(5):
            gen, holder = self._latest()
            if holder is not None and float(holder.get("expires", 0)) > time.time() and not _dead_here(holder):
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["expires"])))
                raise OutputBusy(
                    f"{self.out_url} is being written by another run (run {holder.get('run_id')} on "
                    f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}; its lease runs until {until}); "
                    f"wait for it, or if that run is dead, rerun after its lease expires")
            if _create_exclusive(self._url(gen + 1), self._body()):
                self.generation = gen + 1
                self.took_over = holder
                if holder is not None:
                    log.warning("took over the expired lease of run %s on %s", holder.get("run_id"), self.out_url)
                self._start_renewing()
                return self
        raise OutputBusy(f"{self.out_url}: could not take the lease (other runs keep taking it)")

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="cnc-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(self.seconds / 3, 0.05)):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next tick; expiry is the limit
                log.warning("could not renew the lease on %s: %s", self.out_url, exc)

    def renew(self) -> None:
        """Push the expiry forward, unless another run has taken the lease (then mark it lost)."""
        gen, holder = self._latest()
        if gen != self.generation or (holder or {}).get("run_id") != self.run_id:
            if not self.lost:
                log.error("lost the lease on %s to run %s", self.out_url, (holder or {}).get("run_id"))
            self.lost = True
            self._stop.set()
            return
        storage.write_bytes(self._url(gen), self._body())

    def check(self) -> None:
        """Raise :class:`OutputBusy` if another run has taken the lease from this one."""
        if self.lost:
            raise OutputBusy(f"{self.out_url}: another run took over this run's lease; stopping")

    def release(self) -> None:
        """Stop renewing and remove the lease folder (only while this run still holds it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        gen, holder = self._latest()
        if gen == self.generation and (holder or {}).get("run_id") == self.run_id:
            fs, path = storage.get_fs(self.folder)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path, recursive=True)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(out_url: str, seconds: float = DEFAULT_LEASE_SECONDS) -> Lease:
    """Take the exclusive lease on ``out_url`` (see the module docstring)."""
    return Lease(out_url, seconds).acquire()
