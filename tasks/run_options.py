"""How the shard-job runner runs a job (executor, retries, timeout, lease, reject share): the one
owner of these defaults, free of heavy imports so the CLI can read them at start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_LEASE_SECONDS = 600.0
# auto: Ray when a cluster is given (RAY_ADDRESS, or Ray already started in this process), else a
# process pool on this machine (one shard or memory:// URLs: this process). See tasks/shard_job.py.
EXECUTORS = ("auto", "ray", "processes", "local")


@dataclass
class RunOptions:
    """How to run a job; none of these change the output bytes."""

    executor: str = "auto"
    resume: bool = False
    extend: bool = False  # a finished output takes new inputs as new shards after the existing ones
    progress: bool = False
    on_shard: Callable[[dict[str, Any]], None] | None = None
    max_attempts: int = 3  # per shard, counting the first
    # per attempt, on ray (counted from submission, so it includes a wait for a worker) and processes
    # (counted from the worker's start of the shard); a local attempt runs to its end
    shard_timeout_s: float | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_reject_share: float | None = None  # None: fail only when every input is rejected
    num_cpus: float = 1.0  # per shard task on Ray
    workers: int | None = None  # processes executor: worker processes (default: the CPU count)
    announce: Callable[[str], None] | None = None  # told which executor runs the job, and why
