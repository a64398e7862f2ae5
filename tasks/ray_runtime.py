"""Starting or joining Ray: local by default, a cluster when ``RAY_ADDRESS`` is set.

Nothing else in the project changes between a laptop and a cluster: the same jobs run, with
storage URLs pointing at shared storage (S3) on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

import ray

log = logging.getLogger(__name__)
_joined = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a new local Ray sized to this machine.

    Reuses an already initialised Ray (tests, notebooks). Returns the cluster's resources.
    """
    global _joined
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        with _keep_sigterm_handler():
            if address:
                _joined = True
                log.info("joining Ray cluster at %s", address)
                ray.init(address=address, log_to_driver=False)
            else:
                # address="local": always a Ray of our own, never a `ray start` cluster that happens to
                # run on this machine (its resources, token and lifetime are not this job's)
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                         include_dashboard=_want_dashboard(), log_to_driver=False)
    return ray.cluster_resources()


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the driver's SIGTERM handler with one that raises ``SystemExit(15)``.
    A handler someone installed on purpose is put back afterwards: Prefect's flow engine installs
    one that turns the worker's SIGTERM into a *cancellation*; with Ray's in its place Prefect
    cannot acknowledge the cancel and the run ends Crashed. Python's default (or no Python-level
    handler) is left to Ray, whose ``SystemExit`` at least runs ``finally`` blocks and atexit."""
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if before is not None and before is not signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is not before:
            signal.signal(signal.SIGTERM, before)


def joined_cluster() -> bool:
    """Whether this process joined an existing cluster (which may autoscale) rather than
    starting its own local Ray (whose resources are fixed)."""
    return _joined or bool(os.environ.get("RAY_ADDRESS"))


def _want_dashboard() -> bool:
    return os.environ.get("CNC_RAY_DASHBOARD", "1") not in ("0", "false", "no")


def quiet_ray_data() -> None:
    """Ray Data's own progress bars fight with ours in a terminal; we show one bar per job."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def ray_metrics():
    """``ray.util.metrics`` inside an initialised Ray (a worker or a driver), else None: the jobs'
    custom metrics are optional outside Ray."""
    if not ray.is_initialized():
        return None
    from ray.util import metrics

    return metrics
