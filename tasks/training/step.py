"""The optimisation step around the pure CnC loss: DDP-wrappable module, optimizer, schedule, precision."""

from __future__ import annotations

import contextlib

import torch
from diffusers import DDPMScheduler
from torch import nn

from cnc_model.cnc.pipeline_cnc import CnCPipeline
from cnc_model.cnc.training import CnCBatch, CnCTrainingStep, DropoutConfig
from tasks.training.config import TrainConfig


class CnCLossModule(nn.Module):
    """One module whose ``forward`` returns the loss, so DDP syncs the fusers' gradients.

    Only the trainable fusers are registered as submodules (DDP broadcasts and reduces them);
    the frozen SD parts are held outside the module tree.
    """

    def __init__(self, step: CnCTrainingStep) -> None:
        super().__init__()
        self.trainable = nn.ModuleList(step.trainable_modules())
        object.__setattr__(self, "step", step)

    def forward(self, batch: CnCBatch, generator: torch.Generator) -> torch.Tensor:
        return self.step.loss(batch, generator)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")


def build_step(cfg: TrainConfig, pipe: CnCPipeline, device: torch.device) -> CnCTrainingStep:
    """The stage's loss on ``device``: frozen SD (bf16 when mixed precision), fp32 fusers."""
    frozen_dtype = torch.bfloat16 if use_bf16(cfg, device) else torch.float32
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        if module is not None:
            _move(module, device, frozen_dtype)
    _move(pipe.local_fuser, device, torch.float32)
    _move(pipe.global_fuser, device, torch.float32)
    step = CnCTrainingStep(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                           DDPMScheduler.from_config(pipe.scheduler.config), pipe.local_fuser, pipe.global_fuser,
                           stage=cfg.stage, dropout=DropoutConfig(cfg.text_dropout, cfg.condition_dropout),
                           encoder_grad=cfg.encoder_grad)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.stage in ("local", "full"):
            pipe.local_fuser.enable_gradient_checkpointing()
    return step


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    if module.dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a constant rate after an optional linear warm-up."""
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    warmup = cfg.optim.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, schedule


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if use_bf16(cfg, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
