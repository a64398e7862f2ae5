"""``cnc glod-sweep``: a sweep file (GLoD specs x a grid) -> scored images, a results table, figures."""

from __future__ import annotations

import typer


def glod_sweep(
    sweep: str = typer.Option(..., "--sweep", help="sweep YAML: specs x grid (see examples/glod_sweep.yaml)"),
    out: str = typer.Option(..., "--out", help="output URL: shards/, results.parquet, contact sheets, plot"),
    clip: str = typer.Option("tiny", "--clip", help="CLIP for the alignment scores: tiny, or a model id / folder"),
    shard_size: int = typer.Option(16, "--shard-size", min=1, help="images per output shard"),
    actors: int = typer.Option(1, "--actors", min=1, help="rendering actors"),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0, help="GPUs per actor"),
    device: str = typer.Option("cpu", "--device", help="torch device of the actors"),
    executor: str = typer.Option("auto", "--executor", help="auto (Ray; this process for memory://), ray or local"),
    resume: bool = typer.Option(False, "--resume", help="finish an unfinished run in --out"),
) -> None:
    """Render a GLoD sweep (specs x weights x step ranges x seeds) and score every image."""
    from flows.errors import RUNTIME, fail, first_line
    from tasks.generation.sweep import SweepError
    from tasks.generation.sweep_job import run_sweep
    from tasks.shard_job import OutputBusy, OutputConflict, ShardJobFailed

    if executor not in ("auto", "ray", "local"):
        fail(f"--executor must be auto, ray or local, got {executor!r}")
    try:
        result = run_sweep(sweep, out, clip=clip, shard_size=shard_size, actors=actors, gpus_per_actor=gpus_per_actor,
                           device=device, executor=executor, resume=resume, progress=True)
    except ShardJobFailed as exc:
        fail(first_line(exc), RUNTIME)
    except (SweepError, OutputConflict, OutputBusy, OSError, ValueError) as exc:
        fail(first_line(exc))
    typer.echo(result.summary())
    for url in result.figure_urls:
        typer.echo(f"figure: {url}")
