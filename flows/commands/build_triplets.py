"""``cnc build-triplets``: the whole data chain from the command line (no Prefect needed)."""

from __future__ import annotations

from typing import Optional

import typer

from tasks.ingest_config import IngestConfig
from tasks.run_options import RunOptions
from tasks.triplets.config import INPAINT_STEPS, PRESETS, StageOptions, TripletsConfig


def build_triplets(
    source_format: str = typer.Option(..., "--source-format", help="folder, coco-stuff, pickapic or webdataset"),
    source: str = typer.Option(..., "--source", help="source URL"),
    out: str = typer.Option(..., "--out", help="output URL; ingest/ and triplets/ go under it"),
    preset: str = typer.Option(TripletsConfig.preset, "--preset", help=" or ".join(PRESETS)),
    size: int = typer.Option(IngestConfig.size, "--size", help="side of the square crops"),
    shard_size: int = typer.Option(IngestConfig.shard_size, "--shard-size", help="inputs per shard"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N inputs"),
    inpaint_steps: int = typer.Option(INPAINT_STEPS, "--inpaint-steps", help="denoising steps of the inpainting"),
    clip: bool = typer.Option(TripletsConfig.clip, "--clip", help="also store CLIP embeddings of fg and bg"),
    latents: bool = typer.Option(TripletsConfig.latents, "--latents",
                                 help="also store VAE latents of the source crop"),
    gpus_per_inpaint_actor: float = typer.Option(StageOptions.num_gpus, "--inpaint-gpus",
                                                 help="GPUs per inpainting actor"),
    resume: bool = typer.Option(False, "--resume", help="finish an unfinished run in --out"),
    extend: bool = typer.Option(False, "--extend",
                                help="append the source's new inputs to a finished output as new shards "
                                     "(inputs already there are skipped; transient rejects are retried)"),
    executor: str = typer.Option(RunOptions.executor, "--executor",
                                 help="auto, ray (local Ray or RAY_ADDRESS), processes (a pool on this "
                                      "machine) or local (this process); auto says what it picked"),
    max_reject_share: Optional[float] = typer.Option(RunOptions.max_reject_share, "--max-reject-share",
                                                     help="fail a step above this share of rejects "
                                                          "(default: only when every input is rejected)"),
) -> None:
    """Source images -> CnC triplets (fg, inpainted bg, mask, depth maps).

    ``--executor`` runs both steps: ``auto`` picks Ray with RAY_ADDRESS or GPU stages, else a pool
    of worker processes on this machine (no Ray start); it says what it picked."""
    from flows.run_options import run_options
    from flows.errors import fail, fail_with
    from tasks import storage
    from tasks.ingest import run_ingest
    from tasks.shard_job import OutputBusy, OutputConflict, ShardJobFailed
    from tasks.sources import SOURCE_FORMATS
    from tasks.sources.base import SourceError
    from tasks.triplets.job import TripletsInputError, check_executor, check_pool_plan, run_triplets, runs_on_ray

    if source_format not in SOURCE_FORMATS:
        fail(f"unknown --source-format {source_format!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if preset not in PRESETS:
        fail(f"unknown --preset {preset!r}; choose {' or '.join(PRESETS)}")
    options = run_options(executor, RunOptions.max_attempts, RunOptions.shard_timeout_s, max_reject_share)
    stages = {"inpaint": StageOptions(num_gpus=gpus_per_inpaint_actor, cfg={"num_inference_steps": inpaint_steps})}
    try:  # the triplet side's arguments are checked before ingest runs (and writes anything)
        cfg = TripletsConfig(storage.join(out, "ingest"), storage.join(out, "triplets"), preset, clip, latents, stages)
        check_executor(cfg, executor)
        if runs_on_ray(cfg, executor):  # the pools must fit the Ray this would start (a process pool always fits)
            check_pool_plan(cfg)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    try:
        ingest = run_ingest(source_format, source, storage.join(out, "ingest"), size=size, shard_size=shard_size,
                            limit=limit, resume=resume, extend=extend, progress=True, executor=executor,
                            run_options=options)
        typer.echo(f"ingest: {ingest.summary()}")
        result = run_triplets(ingest.out_url, storage.join(out, "triplets"), preset=preset, clip=clip,
                              latents=latents, stages=stages, resume=resume, extend=extend, progress=True,
                              executor=executor,
                              run_options=options)
    except (SourceError, OutputConflict, OutputBusy, ShardJobFailed, TripletsInputError, OSError, ValueError) as exc:
        fail_with(exc)
    typer.echo(f"triplets: {result.summary()}")
    rate = result.num_inputs_run / max(result.seconds, 1e-9)
    typer.echo(f"triplets: {rate:.2f} sources/s over {result.seconds:.1f} s on {result.executor}")
    if result.preview_url:
        typer.echo(f"contact sheet: {result.preview_url}")
