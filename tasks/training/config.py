"""The training config tree: one dataclass per component, one config function per CnC stage.

``local_stage()``, ``global_stage()`` and ``full_stage()`` give the reference settings (AdamW
lr 1e-5, global batch 32, 28 / 24 / 9 epochs, condition dropout 0.1, frozen SD, frozen encoder
run without gradient); every field can be overridden (``stage_config("local", epochs=2)`` or
``dataclasses.replace``). The command line and the Prefect flow build their parameters from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

STAGES = ("local", "global", "full")
"""As ``cnc_model.cnc.training.STAGES`` (not imported: the command line loads this module eagerly)."""
STAGE_EPOCHS = {"local": 28, "global": 24, "full": 9}
"""Epochs of each stage in the paper (CnC §4.1)."""
PREVIOUS_STAGE = {"global": "local", "full": "global"}
"""The stage whose output a stage starts from in a three-stage chain."""
INIT_BASES = ("tiny", "sd15")


@dataclass
class DataConfig:
    """Triplet shards and how they are read."""

    url: str = ""
    """Triplet output of build-triplets (the folder with shards/ and manifest.json), any fsspec URL."""
    val_fraction: float = 0.01
    """Share of samples held out for validation, chosen by a hash of the key (deterministic)."""
    resolution: int | None = None
    """Resize every sample to this side in pixels (None: keep the shards' size)."""
    shuffle_buffer: int = 256
    """Rows of the per-worker shuffle buffer (reseeded each epoch)."""
    prefetch_batches: int = 2
    decode_cpus: float = 1.0
    """CPUs per Ray Data read/decode task (a fraction leaves room for the train workers on small machines)."""


@dataclass
class OptimConfig:
    """AdamW as in the official code (torch defaults besides the learning rate), constant rate."""

    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    """Linear warm-up from 0 (the official run has none)."""
    max_grad_norm: float | None = None
    """Clip the gradient's global norm (None: no clipping, as the official run)."""


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500
    """Also checkpoint every N optimizer steps (every epoch end always checkpoints)."""
    keep_latest: int = 2


@dataclass
class ScalingSpec:
    """Ray Train workers. ``executor="local"`` runs the same loop in this process (no Ray)."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    executor: str = "ray"
    max_failures: int = 2
    """Worker or node failures a run recovers from (from the last checkpoint)."""


@dataclass
class TrainConfig:
    """One CnC training stage, from an initial model to an exported pipeline folder."""

    stage: str = "local"
    out: str = ""
    """Stage output URL: model/ (CnCPipeline), train_report.json, loss_curve.png, checkpoints/."""
    init: str = "tiny"
    """Model to start from: "tiny", "sd15" (SD 1.5 + CLIP ViT-L/14, fresh fusers) or a CnCPipeline folder."""
    init_weights: str | None = None
    """Optional official CnC / Uni-ControlNet checkpoint loaded into the fusers (cnc_model/cnc/convert.py)."""
    from_uni_controlnet: bool = False
    epochs: int = 28
    max_steps: int | None = None
    batch_size: int = 32
    """Global batch: samples per optimizer step over all workers and accumulation steps."""
    grad_accum: int = 1
    seed: int = 0
    text_dropout: float = 0.1
    condition_dropout: float = 0.1
    encoder_grad: bool = False
    """Backpropagate through the frozen SD encoder (official: no; see cnc_model/cnc/training.py)."""
    mixed_precision: str = "auto"
    """"auto" (bf16 autocast on GPUs, none on CPUs), "bf16" or "no". Trainable weights stay fp32."""
    gradient_checkpointing: bool = False
    log_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    on_step: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False, repr=False)
    """Called after every optimizer step with ``{rank, step, epoch, keys}`` (sample keys of the
    step on this worker): for tests (fault injection, sample counts) and custom monitoring."""

    @property
    def micro_batch(self) -> int:
        """Samples per forward on one worker."""
        return self.batch_size // (self.scaling.workers * self.grad_accum)

    def validate(self) -> None:
        """ValueError with one line for a config that cannot run (checked before any work)."""
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if not self.out:
            raise ValueError("an output URL is required")
        if not self.data.url:
            raise ValueError("a data URL is required")
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be >= 1, got {self.max_steps}")
        if self.scaling.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.scaling.workers}")
        if self.scaling.executor not in ("ray", "local"):
            raise ValueError(f"executor must be ray or local, got {self.scaling.executor!r}")
        if self.scaling.executor == "local" and self.scaling.workers != 1:
            raise ValueError("the local executor runs one worker")
        if self.scaling.gpus_per_worker < 0 or self.scaling.cpus_per_worker <= 0:
            raise ValueError("gpus-per-worker must be >= 0 and cpus-per-worker > 0")
        per_step = self.scaling.workers * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(f"batch-size {self.batch_size} is not a multiple of workers x grad-accum ({per_step})")
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"val-fraction must lie in [0, 1), got {self.data.val_fraction}")
        if not (0 <= self.text_dropout <= 1 and 0 <= self.condition_dropout <= 1):
            raise ValueError("dropout probabilities must lie in [0, 1]")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed-precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.optim.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.optim.lr}")
        if self.checkpoint.every_n_steps < 1 or self.checkpoint.keep_latest < 1:
            raise ValueError("checkpoint every-n-steps and keep-latest must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for reports and the run's identity); the callback is left out."""
        d = dataclasses.asdict(self)
        d.pop("on_step", None)
        return d

    def identity(self) -> str:
        """Hash of what decides the trained weights' path: a checkpoint folder holding another
        identity is refused (scaling, epochs and max_steps may change on --resume)."""
        d = self.to_dict()
        for k in ("epochs", "max_steps", "log_every"):
            d.pop(k)
        d["scaling"] = {"executor": d["scaling"]["executor"]}
        d["checkpoint"] = {}
        d["data"].pop("prefetch_batches")
        d["data"].pop("decode_cpus")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_config(stage: str, **overrides: Any) -> TrainConfig:
    """The reference settings of ``stage``, with ``overrides`` (nested: ``data=DataConfig(...)``)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return TrainConfig(**{"stage": stage, "epochs": STAGE_EPOCHS[stage], **overrides})


def local_stage(**overrides: Any) -> TrainConfig:
    """Stage 1, depth disentanglement training: the local fuser, 28 epochs."""
    return stage_config("local", **overrides)


def global_stage(**overrides: Any) -> TrainConfig:
    """Stage 2: the global fuser with soft guidance, 24 epochs."""
    return stage_config("global", **overrides)


def full_stage(**overrides: Any) -> TrainConfig:
    """Stage 3: both fusers fine-tuned together, 9 epochs."""
    return stage_config("full", **overrides)
