"""How every ``cnc`` command ends on an error: one line on stderr and a status that says why.

Status 2 is a usage error (a wrong argument, a conflicting output: fix the command); status 1 is a
runtime failure (the command was right, the work failed: see the message, rerun with ``--resume``).
``flows/cli.py`` and the modules in ``flows/commands/`` import this module; it imports neither.
"""

from __future__ import annotations

from typing import NoReturn

import typer

USAGE = 2
RUNTIME = 1


def fail(message: str, code: int = USAGE) -> NoReturn:
    """Print one line to stderr and exit with ``code`` (usage error by default)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def exit_code_of(exc: BaseException) -> int:
    """Usage (2) for what the user fixes in the command; runtime (1) for work that failed."""
    from tasks.lease import OutputBusy
    from tasks.shard_job import ShardJobFailed

    if isinstance(exc, (ShardJobFailed, OutputBusy)):
        return RUNTIME
    if isinstance(exc, OSError) and "not writable" not in str(exc):
        return RUNTIME
    return USAGE


def fail_with(exc: BaseException) -> NoReturn:
    """End the command on ``exc``: one line, and the exit status its kind calls for."""
    fail(first_line(exc), exit_code_of(exc))


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type's name."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
