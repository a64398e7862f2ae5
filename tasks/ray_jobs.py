"""Long jobs on a Ray cluster through the Ray Jobs API (``JobSubmissionClient``), not Ray Client.

Ray Client (``ray://``) ties the job to the connection of the process that drives it: a dropped
connection ends the job. A submitted job instead runs its entrypoint as a driver on the cluster;
this module submits one, streams its logs to a callback, waits for the end, and stops it when the
caller is interrupted (a Prefect cancellation arrives as ``TerminationSignal``, Ctrl-C as
``KeyboardInterrupt``). Submission ids derive from a caller's key (the flow run id), so a re-run
attaches to the job it started before instead of submitting a second one; a job that failed or
was stopped is retried under the next attempt's id (``<key>-a2``, ...).

Token authentication: the token comes from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token`` (what ``ray get-auth-token --generate`` writes) and is sent as a bearer
header, so it works whatever Ray's in-process auth configuration says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.redact import redact_text

log = logging.getLogger(__name__)

JOBS_ADDRESS_ENV = "CNC_RAY_JOBS_ADDRESS"
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_ID_SAFE = re.compile(r"[^a-zA-Z0-9_-]+")


class RayJobError(RuntimeError):
    """The Ray job failed or was stopped; the message carries its status and Ray's reason."""


@dataclass
class JobSpec:
    """What to run on the cluster and how to find it again."""

    entrypoint: str
    key: str                                     # stable per logical run (a flow run id)
    name: str = "cnc"
    runtime_env: dict[str, Any] | None = None    # None: the cluster's image has the code
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float = 0.0             # the driver only plans; workers do the work


@dataclass
class JobOutcome:
    submission_id: str
    status: str
    attached: bool                               # found from an earlier run, not submitted now
    lines: list[str] = field(default_factory=list)  # log lines that matched ``capture``


def jobs_address(address: str | None = None) -> str | None:
    """The dashboard address to submit to (``http://head:8265``), from the argument or the env."""
    return address or os.environ.get(JOBS_ADDRESS_ENV) or None


def auth_headers() -> dict[str, str]:
    """The bearer header for a token-protected cluster, or {} when no token is configured."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str):
    """A ``JobSubmissionClient`` for ``address`` carrying the auth token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def submission_id(spec: JobSpec, attempt: int) -> str:
    base = _ID_SAFE.sub("-", f"{spec.name}-{spec.key}").strip("-")
    return base if attempt == 1 else f"{base}-a{attempt}"


def find_or_submit(jobs, spec: JobSpec, agent_wait_seconds: float = 120.0) -> tuple[str, bool]:
    """The submission id of this run's job: a live or finished one found by id, else a new one.

    Returns ``(submission_id, attached)``.
    """
    attempt = 1
    while True:
        sid = submission_id(spec, attempt)
        status = _status_or_none(jobs, sid)
        if status is None:
            break
        if status in ("FAILED", "STOPPED"):
            attempt += 1
            continue
        log.info("Ray job %s found (%s): following it instead of submitting again", sid, status)
        return sid, True
    metadata = {**spec.metadata, "cnc_key": spec.key, "cnc_attempt": str(attempt)}
    deadline = time.monotonic() + agent_wait_seconds
    while True:
        try:
            jobs.submit_job(entrypoint=spec.entrypoint, submission_id=sid, runtime_env=spec.runtime_env,
                            metadata=metadata, entrypoint_num_cpus=spec.entrypoint_num_cpus)
            break
        except RuntimeError as exc:  # a head that just started has no job agent yet
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    log.info("Ray job %s submitted", sid)
    return sid, False


def run_job(spec: JobSpec, address: str, on_line: Callable[[str], None] = print,
            capture: str | None = None, poll_seconds: float = 2.0) -> JobOutcome:
    """Submit (or find) the job, stream its log lines to ``on_line``, wait for its end.

    Lines that start with ``capture`` are also returned (how an entrypoint hands back a result).
    Raises ``RayJobError`` if the job ends FAILED or STOPPED. If the caller is interrupted while
    waiting (a signal: Ctrl-C, SIGTERM turned into an exception, Prefect's cancellation), the job
    is stopped first; an ordinary error (the dashboard unreachable) leaves it running.
    """
    jobs = client(address)
    sid, attached = find_or_submit(jobs, spec)
    outcome = JobOutcome(sid, "PENDING", attached)

    def emit(line: str) -> None:
        line = redact_text(line)
        if capture and line.startswith(capture):
            outcome.lines.append(line)
        on_line(line)

    try:
        outcome.status = follow(jobs, sid, emit, poll_seconds)
    except Exception:
        raise  # lost contact, not a cancellation: the job runs on; a retry attaches to it again
    except BaseException:  # KeyboardInterrupt, SystemExit, Prefect's TerminationSignal (cancellation)
        stop(jobs, sid)
        raise
    if outcome.status != "SUCCEEDED":
        info = jobs.get_job_info(sid)
        raise RayJobError(f"Ray job {sid} ended {outcome.status}: {redact_text(info.message or '')}".rstrip(": "))
    return outcome


def follow(jobs, sid: str, emit: Callable[[str], None], poll_seconds: float = 2.0) -> str:
    """Stream a job's log lines (bounded memory: one chunk at a time) until it ends; its status.

    The log tail runs in a helper thread (it is a websocket); this thread polls the status, so
    an interrupt here is seen at once.
    """
    done = threading.Event()
    failure: list[BaseException] = []

    def tail() -> None:
        async def consume() -> None:
            partial = ""
            async for chunk in jobs.tail_job_logs(sid):
                partial += chunk
                *lines, partial = partial.split("\n")
                for line in lines:
                    emit(line)
            if partial:
                emit(partial)

        try:
            asyncio.run(consume())
        except Exception as exc:  # noqa: BLE001 - a broken log stream must not hide the job's result
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=tail, name=f"ray-job-logs-{sid}", daemon=True).start()
    while True:
        status = str(jobs.get_job_status(sid).value)
        if status in _TERMINAL:
            done.wait(timeout=30)  # let the tail deliver the last lines
            if failure:
                log.warning("log stream of Ray job %s broke: %s", sid, failure[0])
            return status
        time.sleep(poll_seconds)


def stop(jobs, sid: str, wait_seconds: float = 30.0) -> str | None:
    """Ask Ray to stop the job and wait (bounded) until it is seen terminal; its last status."""
    try:
        jobs.stop_job(sid)
    except Exception as exc:  # noqa: BLE001 - best effort on the way out; the status below says
        log.warning("stopping Ray job %s: %s", sid, exc)
    deadline = time.monotonic() + wait_seconds
    status = None
    while time.monotonic() < deadline:
        status = _status_or_none(jobs, sid)
        if status is None or status in _TERMINAL:
            break
        time.sleep(0.5)
    log.info("Ray job %s stopped (%s)", sid, status)
    return status


def _status_or_none(jobs, sid: str) -> str | None:
    try:
        return str(jobs.get_job_status(sid).value)
    except RuntimeError as exc:  # the SDK raises RuntimeError("... does not exist") for an unknown id
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise
