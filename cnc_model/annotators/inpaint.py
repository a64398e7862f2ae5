"""Background inpainting for CnC triplets: Stable Diffusion inpainting with the reference settings.

CnC makes the background I_b by inpainting the source I_s where the (dilated) object mask is,
with a prompt asking for empty scenery. :class:`Inpainter` wraps diffusers'
``StableDiffusionInpaintPipeline`` and adds what a data pipeline needs on top:

* one ``torch.Generator`` per sample, seeded from the sample's key, so a re-run reproduces a
  sample and its result does not depend on which other samples share its batch;
* batched calls (one pipeline call for a whole micro-batch), the fixed prompts encoded once;
* fp16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionInpaintPipeline

PROMPT = "empty scenery, ultra detailed, no people"
NEGATIVE_PROMPT = "low resolution, worst quality, low quality"


@dataclass(frozen=True)
class InpaintSettings:
    """The CnC reference settings (strength 1, guidance 10, 25 steps); steps are configurable."""

    prompt: str = PROMPT
    negative_prompt: str = NEGATIVE_PROMPT
    strength: float = 1.0
    guidance_scale: float = 10.0
    num_inference_steps: int = 25


def seed_from_key(key: str, salt: str = "cnc-inpaint") -> int:
    """A 63-bit seed derived from a sample key (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def default_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class Inpainter:
    """Batched, per-key-seeded SD inpainting (``inpaint(images, masks, keys) -> list of HxWx3 uint8``)."""

    def __init__(self, pipeline: StableDiffusionInpaintPipeline, settings: InpaintSettings | None = None):
        self.pipeline = pipeline
        self.settings = settings or InpaintSettings()
        self._embeds: tuple[torch.Tensor, torch.Tensor] | None = None
        pipeline.set_progress_bar_config(disable=True)

    def prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative prompt) text embeddings, computed once: the prompts never change."""
        if self._embeds is None:
            s = self.settings
            cond, uncond = self.pipeline.encode_prompt(s.prompt, self.pipeline.device, 1, True, s.negative_prompt)
            self._embeds = (cond, uncond)
        return self._embeds

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, device: str | None = None,
                        settings: InpaintSettings | None = None, **kwargs) -> "Inpainter":
        """Load SD inpainting weights (hub id or local folder); fp16 on CUDA unless ``torch_dtype`` is given."""
        device = default_device(device)
        kwargs.setdefault("torch_dtype", torch.float16 if device.startswith("cuda") else torch.float32)
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model_id_or_path, **kwargs)
        return cls(pipe.to(device), settings)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | None = None, settings: InpaintSettings | None = None) -> "Inpainter":
        """Seeded tiny inpainting pipeline (9-channel UNet) built in-process: runs on a CPU in milliseconds."""
        from cnc_model.tiny import tiny_sd_components

        pipe = StableDiffusionInpaintPipeline(**tiny_sd_components(seed, unet_in_channels=9), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        return cls(pipe.to(default_device(device)), settings)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the pipeline in diffusers' folder layout (safetensors)."""
        self.pipeline.save_pretrained(path, safe_serialization=True)

    @torch.no_grad()
    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], keys: Sequence[str],
                seeds: Sequence[int] | None = None) -> list[np.ndarray]:
        """Inpaint each image where its mask is non-zero; one call for the whole batch.

        ``images``: HxWx3 uint8, all the same size (a multiple of 8); ``masks``: HxW, non-zero = repaint.
        Sample i is generated from ``torch.Generator().manual_seed(seeds[i])`` (default: from ``keys[i]``),
        so its noise does not depend on its batch neighbours. Returns HxWx3 uint8 arrays.
        """
        if not (len(images) == len(masks) == len(keys)):
            raise ValueError("images, masks and keys must have the same length")
        if not images:
            return []
        h, w = images[0].shape[:2]
        if any(im.shape[:2] != (h, w) for im in images) or any(m.shape[:2] != (h, w) for m in masks):
            raise ValueError("every image and mask of a batch must have the same size")
        if h % 8 or w % 8:
            raise ValueError(f"image size must be a multiple of 8, got {w}x{h}")
        seeds = list(seeds) if seeds is not None else [seed_from_key(k) for k in keys]
        # CPU generators: the same noise on any device, so CPU and GPU runs start from the same latents
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        s = self.settings
        n = len(images)
        cond, uncond = self.prompt_embeds()
        out = self.pipeline(
            prompt_embeds=cond.expand(n, -1, -1),
            negative_prompt_embeds=uncond.expand(n, -1, -1),
            image=[PIL.Image.fromarray(np.ascontiguousarray(im)) for im in images],
            mask_image=[PIL.Image.fromarray(((np.asarray(m) > 0) * 255).astype(np.uint8)) for m in masks],
            height=h, width=w,
            strength=s.strength,
            guidance_scale=s.guidance_scale,
            num_inference_steps=s.num_inference_steps,
            generator=generators,
            output_type="np",
        ).images
        return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out]
