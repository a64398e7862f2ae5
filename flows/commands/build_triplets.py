"""``cnc build-triplets``: the whole data chain from the command line (no Prefect needed)."""

from __future__ import annotations

from typing import Optional

import typer


def build_triplets(
    source_format: str = typer.Option(..., "--source-format", help="folder, coco-stuff, pickapic or webdataset"),
    source: str = typer.Option(..., "--source", help="source URL"),
    out: str = typer.Option(..., "--out", help="output URL; ingest/ and triplets/ go under it"),
    preset: str = typer.Option("tiny", "--preset", help="tiny or sd15"),
    size: int = typer.Option(512, "--size", help="side of the square crops"),
    shard_size: int = typer.Option(256, "--shard-size", help="inputs per shard"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N inputs"),
    inpaint_steps: int = typer.Option(25, "--inpaint-steps", help="denoising steps of the inpainting"),
    clip: bool = typer.Option(False, "--clip", help="also store CLIP embeddings of fg and bg"),
    latents: bool = typer.Option(False, "--latents", help="also store VAE latents of the source crop"),
    gpus_per_inpaint_actor: float = typer.Option(0.0, "--inpaint-gpus", help="GPUs per inpainting actor"),
    resume: bool = typer.Option(False, "--resume", help="finish an unfinished run in --out"),
) -> None:
    """Source images -> CnC triplets (fg, inpainted bg, mask, depth maps) on Ray."""
    from flows.cli import fail
    from tasks import storage
    from tasks.ingest import OutputConflict, run_ingest
    from tasks.sources import SOURCE_FORMATS
    from tasks.sources.base import SourceError
    from tasks.triplets.job import StageOptions, TripletsConfig, TripletsInputError, _plan_ray_pools, run_triplets

    if source_format not in SOURCE_FORMATS:
        fail(f"unknown --source-format {source_format!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if preset not in ("tiny", "sd15"):
        fail(f"unknown --preset {preset!r}; choose tiny or sd15")
    stages = {"inpaint": StageOptions(num_gpus=gpus_per_inpaint_actor, cfg={"num_inference_steps": inpaint_steps})}
    try:  # the triplet side's arguments are checked before ingest runs (and writes anything)
        _plan_ray_pools(TripletsConfig(storage.join(out, "ingest"), storage.join(out, "triplets"), preset, clip,
                                       latents, stages))
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    try:
        ingest = run_ingest(source_format, source, storage.join(out, "ingest"), size=size, shard_size=shard_size,
                            limit=limit, resume=resume, progress=True)
        typer.echo(f"ingest: {ingest.summary()}")
        result = run_triplets(ingest.out_url, storage.join(out, "triplets"), preset=preset, clip=clip,
                              latents=latents, stages=stages, resume=resume, progress=True)
    except (SourceError, OutputConflict, TripletsInputError, OSError, ValueError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    typer.echo(f"triplets: {result.summary()}")
    if result.preview_url:
        typer.echo(f"contact sheet: {result.preview_url}")
