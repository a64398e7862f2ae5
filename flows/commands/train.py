"""``cnc train``: one CnC stage, or the three in order, on Ray Train (no Prefect needed).

Defaults come from the config tree (tasks/training/config.py); arguments are checked, and the
shards' fields for every requested stage, before any worker starts (exit 2 with one line).
"""

from __future__ import annotations

from typing import Optional

import typer

from tasks.training.config import CheckpointConfig, DataConfig, OptimConfig, ScalingSpec, TrainConfig

_T, _D, _O, _C, _S = TrainConfig(), DataConfig(), OptimConfig(), CheckpointConfig(), ScalingSpec()


def build_config(stage: str, data: str, out: str, init: str = _T.init, init_weights: Optional[str] = None,
                 uni_controlnet: bool = False, workers: int = _S.workers, gpus_per_worker: float = _S.gpus_per_worker,
                 cpus_per_worker: float = _S.cpus_per_worker, executor: str = _S.executor,
                 max_failures: int = _S.max_failures, batch_size: int = _T.batch_size, grad_accum: int = _T.grad_accum,
                 epochs: Optional[int] = None, max_steps: Optional[int] = None, lr: float = _O.lr,
                 warmup_steps: int = _O.warmup_steps, max_grad_norm: Optional[float] = None,
                 val_fraction: float = _D.val_fraction, resolution: Optional[int] = None,
                 decode_cpus: float = _D.decode_cpus, checkpoint_every: int = _C.every_n_steps,
                 keep_checkpoints: int = _C.keep_latest, mixed_precision: str = _T.mixed_precision,
                 gradient_checkpointing: bool = False, encoder_grad: bool = False, seed: int = _T.seed,
                 text_dropout: float = _T.text_dropout, condition_dropout: float = _T.condition_dropout
                 ) -> TrainConfig:
    """The TrainConfig of the command-line / flow parameters (``stage`` "all": the chain's base)."""
    from tasks.training.config import STAGE_EPOCHS

    first = "local" if stage == "all" else stage
    return TrainConfig(
        stage=first, out=out, init=init, init_weights=init_weights, from_uni_controlnet=uni_controlnet,
        epochs=epochs or STAGE_EPOCHS.get(first, 1), max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, seed=seed, text_dropout=text_dropout, condition_dropout=condition_dropout,
        encoder_grad=encoder_grad, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        data=DataConfig(url=data, val_fraction=val_fraction, resolution=resolution, decode_cpus=decode_cpus),
        optim=OptimConfig(lr=lr, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm),
        checkpoint=CheckpointConfig(every_n_steps=checkpoint_every, keep_latest=keep_checkpoints),
        scaling=ScalingSpec(workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                            executor=executor, max_failures=max_failures),
    )


def train(
    stage: str = typer.Option("all", "--stage", help="local, global, full, or all (the three in order)"),
    data: str = typer.Option(..., "--data", help="triplet output of build-triplets (URL)"),
    out: str = typer.Option(..., "--out", help="output URL (with --stage all: one folder per stage under it)"),
    init: str = typer.Option(_T.init, "--init", help="tiny, sd15 or a CnC pipeline folder to start from"),
    init_weights: Optional[str] = typer.Option(None, "--init-weights",
                                               help="official CnC / Uni-ControlNet checkpoint for the fusers"),
    uni_controlnet: bool = typer.Option(False, "--uni-controlnet", help="--init-weights is a Uni-ControlNet file"),
    workers: int = typer.Option(_S.workers, "--workers", help="Ray Train workers"),
    gpus_per_worker: float = typer.Option(_S.gpus_per_worker, "--gpus-per-worker"),
    cpus_per_worker: float = typer.Option(_S.cpus_per_worker, "--cpus-per-worker"),
    executor: str = typer.Option(_S.executor, "--executor", help="ray (Ray Train) or local (this process)"),
    batch_size: int = typer.Option(_T.batch_size, "--batch-size", help="global batch per optimizer step"),
    grad_accum: int = typer.Option(_T.grad_accum, "--grad-accum", help="micro-batches per optimizer step"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs per stage (default: 28 / 24 / 9)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop each stage after S steps"),
    lr: float = typer.Option(_O.lr, "--lr"),
    max_grad_norm: Optional[float] = typer.Option(None, "--clip-grad", help="clip the gradient norm"),
    val_fraction: float = typer.Option(_D.val_fraction, "--val-fraction", help="held-out share (key hash)"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="resize samples to this side"),
    checkpoint_every: int = typer.Option(_C.every_n_steps, "--checkpoint-every", help="steps between checkpoints"),
    mixed_precision: str = typer.Option(_T.mixed_precision, "--mixed-precision", help="auto, bf16 or no"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    seed: int = typer.Option(_T.seed, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out (error if there is none)"),
) -> None:
    """Train CnC (local fuser, global fuser, both) from triplet shards to a pipeline folder."""
    from flows.errors import fail
    from tasks.training.data import TrainingDataError
    from tasks.training.job import STAGE_ORDER, TrainingConflict, check_chain, run_all

    if stage not in (*STAGE_ORDER, "all"):
        fail(f"unknown --stage {stage!r}; choose local, global, full or all")
    cfg = build_config(stage, data, out, init, init_weights, uni_controlnet, workers, gpus_per_worker,
                       cpus_per_worker, executor, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                       max_steps=max_steps, lr=lr, max_grad_norm=max_grad_norm, val_fraction=val_fraction,
                       resolution=resolution, checkpoint_every=checkpoint_every, mixed_precision=mixed_precision,
                       gradient_checkpointing=gradient_checkpointing, seed=seed)
    stages = STAGE_ORDER if stage == "all" else (stage,)
    try:
        check_chain(cfg, stages)
    except (TrainingDataError, TrainingConflict, OSError, ValueError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    try:
        if stage == "all":
            results = run_all(cfg, epochs=epochs, resume=resume, progress=True)
        else:
            from tasks.training.job import run_training

            results = [run_training(cfg, resume=resume, progress=True)]
    except (TrainingConflict, TrainingDataError) as exc:
        fail(str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - one line, non-zero exit; checkpoints stay for a re-run
        fail(f"training failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", code=1)
    for result in results:
        typer.echo(result.summary())
    typer.echo(f"model: {results[-1].model_url}")
    typer.echo(f"loss curve: {results[-1].loss_curve_url}")
    typer.echo(f"report: {results[-1].report_url}")
