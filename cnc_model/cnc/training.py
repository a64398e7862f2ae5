"""One CnC training step, independent of any launcher (Ray Train only wraps it).

ε-prediction MSE on SD latents (LDM objective), uniform timesteps, condition dropout as in the
reference (text -> "" with p=0.1; each of fg depth, bg depth, fg embedding, bg embedding -> zeros
with p=0.1, all independent), and the trainable set of each CnC stage:

* ``local``  - depth disentanglement training: the local fuser (depth encoder + UNet copy);
  exemplars are not used.
* ``global`` - the global fuser; depth is not used, soft guidance is.
* ``full``   - both fusers, all conditions.

The SD UNet, VAE and text encoder are always frozen. As in the official code, the frozen UNet's
encoder and mid block run without gradient (:mod:`cnc_model.cnc.frozen_encoder`): the trainable
parts get gradient only through the UNet's decoder. ``encoder_grad=True`` lets it flow through the
frozen encoder too (our option: what diffusers' ControlNet training does; same loss value, other
gradients for the exemplar tokens, more memory).

This module computes the loss only; the launcher (accumulation, clipping, schedules, checkpoints,
Ray Train) lives in ``tasks/training``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cnc_model.cnc.conditioning import CnCConditions, cnc_noise_prediction
from cnc_model.cnc.frozen_encoder import FrozenEncoderUNet
from cnc_model.cnc.soft_guidance import install_soft_guidance

STAGES = ("local", "global", "full")


@dataclass
class CnCBatch:
    """A training batch. Give ``latents`` (already scaled by the VAE factor) or ``images``
    (``(B, 3, H, W)`` in [-1, 1]); ``prompt_embeds`` or ``captions``. Conditions: depth maps
    ``(B, 3, H, W)`` in [0, 1], CLIP image embeddings ``(B, D)``, masks ``(B, 1, H, W)``."""

    latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    captions: list[str] | None = None
    fg_depth: torch.Tensor | None = None
    bg_depth: torch.Tensor | None = None
    fg_embeds: torch.Tensor | None = None
    bg_embeds: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class DropoutConfig:
    """Condition dropout probabilities (CnC §4.1: 0.1 each, independent)."""

    text: float = 0.1
    conditions: float = 0.1


@dataclass
class CnCTrainingStep:
    """Holds the models of one stage and computes / applies one optimisation step.

    >>> step = CnCTrainingStep(unet, vae, text_encoder, tokenizer, noise_scheduler,
    ...                        local_fuser, global_fuser, stage="local")
    >>> optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-5)
    >>> metrics = step.train_step(batch, optimizer)
    """

    unet: nn.Module
    vae: nn.Module | None
    text_encoder: nn.Module | None
    tokenizer: object | None
    noise_scheduler: object
    local_fuser: nn.Module | None = None
    global_fuser: nn.Module | None = None
    stage: str = "local"
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    encoder_grad: bool = False
    """Backpropagate through the frozen UNet encoder and mid block (not the official behaviour)."""
    _empty_embeds: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.uses_depth and self.local_fuser is None:
            raise ValueError(f"stage {self.stage!r} needs a local_fuser")
        if self.uses_exemplars and self.global_fuser is None:
            raise ValueError(f"stage {self.stage!r} needs a global_fuser")
        install_soft_guidance(self.unet)
        if self.local_fuser is not None:
            install_soft_guidance(self.local_fuser)
        self.configure_trainable()

    @property
    def uses_depth(self) -> bool:
        return self.stage in ("local", "full")

    @property
    def uses_exemplars(self) -> bool:
        return self.stage in ("global", "full")

    def trainable_modules(self) -> list[nn.Module]:
        """The stage's trainable modules (local fuser, global fuser, or both)."""
        modules = []
        if self.uses_depth:
            modules.append(self.local_fuser)
        if self.uses_exemplars:
            modules.append(self.global_fuser)
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules() for p in m.parameters()]

    def configure_trainable(self) -> None:
        """Freeze everything, then unfreeze the stage's modules and put them in train mode."""
        for module in (self.unet, self.vae, self.text_encoder, self.local_fuser, self.global_fuser):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        for module in self.trainable_modules():
            module.requires_grad_(True)
            module.train()

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(device))[0]

    def empty_prompt_embeds(self, device: torch.device) -> torch.Tensor:
        """Embedding of the empty caption (text dropout target), computed once."""
        if self._empty_embeds is None or self._empty_embeds.device != device:
            self._empty_embeds = self.encode_text([""], device)
        return self._empty_embeds

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    # ------------------------------------------------------------------ the step
    def loss(self, batch: CnCBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε-prediction MSE with fresh noise, timesteps and condition dropout (from ``generator``)."""
        device = self.unet.device
        latents = batch.latents if batch.latents is not None else self.encode_latents(batch.images.to(device), generator)
        latents = latents.to(device)
        b = latents.shape[0]
        if batch.prompt_embeds is not None:
            prompt_embeds = batch.prompt_embeds.to(device)
        else:
            prompt_embeds = self.encode_text(list(batch.captions), device)

        def draw(p: float) -> torch.Tensor:
            return (torch.rand(b, generator=generator, device=generator.device if generator else "cpu") < p).to(device)

        drop_text = draw(self.dropout.text)
        if drop_text.any():
            empty = self.empty_prompt_embeds(device).to(prompt_embeds.dtype).expand_as(prompt_embeds)
            prompt_embeds = torch.where(drop_text[:, None, None], empty, prompt_embeds)

        def dropped(x: torch.Tensor | None) -> torch.Tensor | None:
            keep = ~draw(self.dropout.conditions)
            if x is None:
                return None
            x = x.to(device=device, dtype=latents.dtype)
            return x * keep.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)

        # always draw all four, so the random stream does not depend on the stage
        fg_depth, bg_depth = dropped(batch.fg_depth), dropped(batch.bg_depth)
        fg_embeds, bg_embeds = dropped(batch.fg_embeds), dropped(batch.bg_embeds)
        conditions = CnCConditions()
        if self.uses_depth:
            if fg_depth is None or bg_depth is None:
                raise ValueError(f"stage {self.stage!r} needs fg_depth and bg_depth in the batch")
            conditions.fg_depth, conditions.bg_depth = fg_depth, bg_depth
        if self.uses_exemplars:
            if fg_embeds is None or bg_embeds is None or batch.mask is None:
                raise ValueError(f"stage {self.stage!r} needs fg_embeds, bg_embeds and mask in the batch")
            conditions.fg_tokens, conditions.bg_tokens = self.global_fuser(fg_embeds, bg_embeds)
            conditions.mask = batch.mask.to(device=device, dtype=latents.dtype)

        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(device=device, dtype=latents.dtype)
        num_train = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train, (b,), generator=generator, device=generator.device if generator else "cpu")
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")

        local = self.local_fuser if self.uses_depth else None
        unet = self.unet if self.encoder_grad else FrozenEncoderUNet(self.unet)
        pred = cnc_noise_prediction(unet, local, noisy, timesteps, prompt_embeds, conditions)
        return F.mse_loss(pred.float(), target.float())

    def train_step(
        self, batch: CnCBatch, optimizer: torch.optim.Optimizer, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """Zero grads, loss, backward, optimizer step. Returns ``{"loss": ...}``.

        A convenience for notebooks; ``tasks.training`` builds its own step (accumulation,
        clipping, mixed precision) around :meth:`loss`."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch, generator)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}
