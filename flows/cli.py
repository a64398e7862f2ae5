"""The ``cnc`` command line: one command per job, each callable without Prefect.

Arguments are checked before any work starts; a wrong one exits with status 2 and one line.
"""

from __future__ import annotations

import logging
from typing import Optional

import typer

from flows.errors import fail, fail_with
from flows.run_options import run_options
from tasks.ingest_config import IngestConfig
from tasks.run_options import RunOptions

app = typer.Typer(help="Compose and Conquer: build triplet data, train, evaluate and generate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def ingest(
    source_format: str = typer.Option(..., "--source-format", help="folder, coco-stuff, pickapic or webdataset"),
    source: str = typer.Option(..., "--source", help="source URL (path, file://, s3://, memory://)"),
    out: str = typer.Option(..., "--out", help="output URL for the shards"),
    size: int = typer.Option(IngestConfig.size, "--size", help="side of the square centre crop"),
    shard_size: int = typer.Option(IngestConfig.shard_size, "--shard-size", help="inputs per shard"),
    resume: bool = typer.Option(False, "--resume", help="finish an unfinished run in --out"),
    extend: bool = typer.Option(False, "--extend",
                                help="append the source's new inputs to a finished output as new shards "
                                     "(inputs already there are skipped; transient rejects are retried)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N inputs"),
    quality: int = typer.Option(IngestConfig.quality, "--quality", help="JPEG quality of the crops"),
    executor: str = typer.Option(RunOptions.executor, "--executor",
                                 help="auto, ray (local Ray or RAY_ADDRESS), processes (a pool on this "
                                      "machine) or local (this process); auto says what it picked"),
    max_attempts: int = typer.Option(RunOptions.max_attempts, "--max-attempts",
                                     help="tries per shard before it is recorded as failed"),
    shard_timeout: Optional[float] = typer.Option(RunOptions.shard_timeout_s, "--shard-timeout",
                                                  help="seconds per shard attempt (Ray)"),
    max_reject_share: Optional[float] = typer.Option(RunOptions.max_reject_share, "--max-reject-share",
                                                     help="fail the run above this share of rejects "
                                                          "(default: only when every input is rejected)"),
) -> None:
    """Shard source images into WebDataset tars of centre crops (Ray)."""
    from tasks.ingest import run_ingest
    from tasks.shard_job import OutputBusy, OutputConflict, ShardJobFailed
    from tasks.sources import SOURCE_FORMATS
    from tasks.sources.base import SourceError

    if source_format not in SOURCE_FORMATS:
        fail(f"unknown --source-format {source_format!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    options = run_options(executor, max_attempts, shard_timeout, max_reject_share)
    try:
        result = run_ingest(source_format, source, out, size=size, shard_size=shard_size, resume=resume,
                            extend=extend, limit=limit, quality=quality, progress=True, executor=executor,
                            run_options=options)
    except (SourceError, OutputConflict, OutputBusy, ShardJobFailed, OSError, ValueError) as exc:
        fail_with(exc)
    typer.echo(result.summary())


@app.command()
def demo(
    out: str = typer.Option("demo-output", "--out", help="where the demo writes everything"),
) -> None:
    """Run the main job end to end on bundled sample photos with the tiny preset, through Prefect."""
    from flows.demo import NotADemoOutput, run_demo

    try:
        run_demo(out)
    except NotADemoOutput as exc:
        fail(str(exc))


def _register_commands() -> None:
    """Commands whose modules live in flows/commands (they import their heavy parts lazily)."""
    from flows.commands.build_triplets import build_triplets
    from flows.commands.evaluate import evaluate
    from flows.commands.generate import generate
    from flows.commands.generate_batch import generate_batch
    from flows.commands.glod import glod
    from flows.commands.models import app as models_app
    from flows.commands.retrain import retrain
    from flows.commands.train import train
    from flows.commands.glod_sweep import glod_sweep

    app.command("build-triplets")(build_triplets)
    app.command("evaluate")(evaluate)
    app.command("generate")(generate)
    app.command("generate-batch")(generate_batch)
    app.command("glod-sweep")(glod_sweep)
    app.command("glod")(glod)
    app.add_typer(models_app, name="models")
    app.command("retrain")(retrain)
    app.command("train")(train)


_register_commands()


def main() -> None:
    from tasks.redact import install_log_redaction

    logging.basicConfig(level=logging.WARNING)
    install_log_redaction()  # URLs in log lines lose user-info and query strings
    app()


if __name__ == "__main__":
    main()
