"""How the shard-job runner runs a job (executor, retries, timeout, lease, reject share): the one
owner of these defaults, free of heavy imports so the CLI can read them at start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_LEASE_SECONDS = 600.0
EXECUTORS = ("ray", "local")


@dataclass
class RunOptions:
    """How to run a job; none of these change the output bytes."""

    executor: str = "ray"
    resume: bool = False
    progress: bool = False
    on_shard: Callable[[dict[str, Any]], None] | None = None
    max_attempts: int = 3  # per shard, counting the first
    shard_timeout_s: float | None = None  # per attempt; enforced on Ray (a local attempt cannot be interrupted)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_reject_share: float | None = None  # None: fail only when every input is rejected
    num_cpus: float = 1.0  # per shard task on Ray
