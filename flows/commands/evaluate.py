"""``cnc evaluate``: FID, Inception Score and CLIPScore of generated image sets against real images."""

from __future__ import annotations

from typing import Optional

import typer


def parse_settings(values: list[str]) -> dict[str, str]:
    """``NAME=URL`` pairs -> ``{name: url}`` (ValueError naming the bad one)."""
    settings: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise ValueError(f"--setting {value!r}: expected NAME=URL (e.g. depth=s3://bucket/gen-depth)")
        if name in settings:
            raise ValueError(f"--setting {name!r} given twice")
        settings[name] = url
    return settings


def evaluate(
    real: str = typer.Option(..., "--real", help="shard set of the real (held-out) images"),
    setting: list[str] = typer.Option(..., "--setting", help="NAME=URL of a generated shard set; repeat "
                                      "(the paper's: depth=..., exemplar=..., both=...)"),
    out: str = typer.Option(..., "--out", help="output URL: metrics.json, metrics.png, per-shard stats"),
    preset: str = typer.Option("sd15", "--preset", help="sd15 (real metrics) or tiny (plumbing numbers)"),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", help="local path of the FID "
                                                    "Inception weights (pt_inception / torch-fidelity file)"),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP model id or local folder (default: the preset's)"),
    condition_root: Optional[str] = typer.Option(None, "--condition-root", help="the generation's condition root: "
                                                 "also measure condition fidelity (depth error, exemplar similarity)"),
    depth: Optional[str] = typer.Option(None, "--depth", help="depth model for condition fidelity (default: the "
                                        "preset's)"),
    executor: str = typer.Option("ray", "--executor", help="ray or local"),
    actors: int = typer.Option(1, "--actors", min=1, help="feature-extraction actors"),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0, help="GPUs per actor"),
    device: str = typer.Option("cpu", "--device", help="torch device of the feature nets"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="images per feature-net call"),
    splits: int = typer.Option(10, "--splits", min=1, help="Inception Score splits"),
) -> None:
    """Measure generated sets against real images with mergeable statistics on Ray."""
    from cnc_model.metrics.feature_nets import INCEPTION_WEIGHTS_FILE
    from cnc_model.presets import get_preset
    from flows.errors import fail
    from tasks.evaluation.job import EvaluationConfig, EvaluationConflict, run_evaluation
    from tasks.evaluation.report import metrics_table

    try:
        settings = parse_settings(setting)
        model_preset = get_preset(preset)
    except ValueError as exc:
        fail(str(exc))
    if model_preset.is_tiny:
        feature_net, clip_model = "tiny", clip or "tiny"
    else:
        if inception_weights is None:
            fail(f"--inception-weights PATH is required with --preset {preset}: the file {INCEPTION_WEIGHTS_FILE} "
                 "(FID Inception v3 weights of torch-fidelity / torchmetrics); --preset tiny measures plumbing only")
        feature_net, clip_model = inception_weights, clip or model_preset.clip_image
    cfg = EvaluationConfig(real=real, settings=settings, out=out, feature_net=feature_net, clip=clip_model,
                           splits=splits, batch_size=batch_size, executor=executor, actors=actors,
                           gpus_per_actor=gpus_per_actor, device=device, condition_root=condition_root,
                           depth=(depth or model_preset.depth) if condition_root else None)
    try:
        metrics = run_evaluation(cfg)
    except (FileNotFoundError, EvaluationConflict, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if metrics["plumbing"]:
        typer.echo("note: tiny feature nets — these numbers test the plumbing; they are not FID / IS / CLIPScore")
    for row in metrics_table(metrics):
        typer.echo("  ".join(f"{k}={v}" for k, v in row.items() if v != ""))
    typer.echo(f"metrics: {metrics['metrics_url']}")
    typer.echo(f"figure: {metrics['figure_url']}")
