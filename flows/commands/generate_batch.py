"""``cnc generate-batch``: a job table (parquet / JSONL) -> image shards on a Ray actor pool."""

from __future__ import annotations

from typing import Optional

import typer


def generate_batch(
    rows: Optional[str] = typer.Option(None, "--rows", help="job table URL (.parquet or .jsonl): id, prompt, seed, "
                                       "negative_prompt, steps, guidance_scale, fg/bg depth, fg/bg exemplar, mask"),
    triplets: Optional[str] = typer.Option(None, "--triplets", help="instead of --rows: a triplet shard set, "
                                           "conditioned on its depth maps / exemplars / mask, captions as prompts"),
    setting: str = typer.Option("both", "--setting", help="with --triplets: depth, exemplar or both"),
    steps: int = typer.Option(50, "--steps", min=1, help="with --triplets: denoising steps"),
    seed: int = typer.Option(0, "--seed", help="with --triplets: seed of the first triplet (then +1 each)"),
    out: str = typer.Option(..., "--out", help="output URL: shards/, rejects.parquet, manifest.json"),
    model: str = typer.Option("tiny", "--model", help="'tiny' or a folder saved by CnCPipeline.save_pretrained"),
    condition_root: Optional[str] = typer.Option(None, "--condition-root", help="URL the rows' condition paths "
                                                 "are relative to (nothing outside it is read)"),
    shard_size: int = typer.Option(64, "--shard-size", min=1, help="rows per output shard"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="rows with the same settings per UNet batch"),
    actors: int = typer.Option(1, "--actors", min=1, help="generation actors (models loaded once each)"),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0, help="GPUs per actor"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device of the actors, e.g. cuda"),
    executor: str = typer.Option("auto", "--executor", help="auto (Ray; this process for memory://), ray or local"),
    resume: bool = typer.Option(False, "--resume", help="finish an unfinished run in --out"),
) -> None:
    """Generate every row of a job table with CnC; bad rows become rejects with reasons."""
    from flows.errors import RUNTIME, fail, first_line
    from tasks.generation.job import GenerationConfig, run_generation
    from tasks.generation.table import TableError
    from tasks.shard_job import OutputBusy, OutputConflict, ShardJobFailed

    if executor not in ("auto", "ray", "local"):
        fail(f"--executor must be auto, ray or local, got {executor!r}")
    if (rows is None) == (triplets is None):
        fail("give exactly one of --rows (a job table) or --triplets (a triplet shard set)")
    if triplets is not None:
        from tasks import storage
        from tasks.evaluation.protocol import SETTINGS, write_protocol_tables

        if setting not in SETTINGS:
            fail(f"--setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        if condition_root is not None:
            fail("--condition-root comes from --triplets (its files are copied under --out/tables)")
        try:
            protocol = write_protocol_tables(triplets, storage.join(out, "tables"), steps=steps, seed=seed,
                                             settings=(setting,))
        except (FileNotFoundError, OSError, ValueError) as exc:
            fail(first_line(exc))
        rows, condition_root = protocol["tables"][setting], protocol["condition_root"]
        typer.echo(f"{protocol['rows']} triplets -> {rows} ({protocol['skipped']} incomplete skipped)")
    cfg = GenerationConfig(rows, out.rstrip("/"), model, condition_root, shard_size, batch_size, actors,
                           gpus_per_actor, device)
    try:
        result = run_generation(cfg, executor=executor, resume=resume, progress=True)
    except ShardJobFailed as exc:
        fail(first_line(exc), RUNTIME)
    except (TableError, OutputConflict, OutputBusy, OSError, ValueError) as exc:
        fail(first_line(exc))
    typer.echo(result.summary())
