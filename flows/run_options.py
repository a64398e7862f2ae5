"""The shard runner's options as the ``cnc`` commands take them (shared by every shard-job command)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.errors import fail

if TYPE_CHECKING:
    from tasks.shard_job import RunOptions


def run_options(executor: str, max_attempts: int, shard_timeout: float | None,
                max_reject_share: float | None) -> RunOptions:
    """The runner's options from the command line, checked (a wrong one is a usage error)."""
    from tasks.shard_job import EXECUTORS, RunOptions

    if executor not in EXECUTORS:
        fail(f"unknown --executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if max_attempts < 1:
        fail(f"--max-attempts must be at least 1, got {max_attempts}")
    if shard_timeout is not None and shard_timeout <= 0:
        fail(f"--shard-timeout must be positive, got {shard_timeout}")
    if max_reject_share is not None and not 0 <= max_reject_share <= 1:
        fail(f"--max-reject-share must be between 0 and 1, got {max_reject_share}")
    import typer

    return RunOptions(executor=executor, max_attempts=max_attempts, shard_timeout_s=shard_timeout,
                      max_reject_share=max_reject_share, announce=lambda line: typer.echo(line, err=True))
