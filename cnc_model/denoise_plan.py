"""What one denoising step batches through the UNet and how it combines the outputs.

:class:`DenoisePlan` holds the batched text embeddings (blocks of one row per image) and two
callables: how many blocks step ``i`` needs, and how to compose the batched ε predictions into
one ε̂ per image. Classifier-free guidance is the plan ``[uncond, text]`` with
``ε_u + s (ε_t − ε_u)``; GLoD (:mod:`cnc_model.glod`) is ``[uncond, globals..., locals...]``
with its composition, its local rows only in its local step range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class DenoisePlan:
    """Batched prompt embeddings and the per-step block count / composition."""

    prompt_embeds: torch.Tensor  # (blocks * batch, T, D), block-major
    batch: int  # images generated together (rows per block)
    num_blocks: Callable[[int, int], int]  # (step index, number of steps) -> blocks this step
    compose: Callable[[torch.Tensor, int, int], torch.Tensor]  # (ε of the blocks, step, steps) -> ε̂

    def embeds_for(self, blocks: int) -> torch.Tensor:
        return self.prompt_embeds[: blocks * self.batch]


def cfg_plan(prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None, guidance_scale: float) -> DenoisePlan:
    """Classifier-free guidance (or none when ``guidance_scale <= 1``), as diffusers computes it."""
    batch = prompt_embeds.shape[0]
    if guidance_scale <= 1.0:
        return DenoisePlan(prompt_embeds, batch, lambda i, n: 1, lambda eps, i, n: eps)

    def compose(noise_pred: torch.Tensor, i: int, n: int) -> torch.Tensor:
        noise_uncond, noise_text = noise_pred.chunk(2)
        return noise_uncond + guidance_scale * (noise_text - noise_uncond)

    return DenoisePlan(torch.cat([negative_prompt_embeds, prompt_embeds]), batch, lambda i, n: 2, compose)


def load_glod_spec(glod: Any) -> Any:
    """A ``GLoDSpec``, its dict form or the path of a YAML/JSON spec -> ``GLoDSpec``."""
    from cnc_model.glod.spec import GLoDSpec, load_spec, parse_spec

    if isinstance(glod, GLoDSpec):
        return glod
    if isinstance(glod, (str, os.PathLike)):
        return load_spec(glod)
    if isinstance(glod, Mapping):
        return parse_spec(dict(glod))
    raise TypeError(f"glod must be a GLoDSpec, a mapping or a spec file path, got {type(glod).__name__}")


def glod_plan(
    spec: Any, encode: Callable[[str], torch.Tensor], latent_size: tuple[int, int], num_images: int
) -> DenoisePlan:
    """GLoD's global and local prompt layers (noise composition; layout guidance is not part of
    CnC's loop: skipped, with a warning when the spec sets ``layout_guidance`` itself).
    ``encode(text)`` returns ``(1, T, D)`` embeddings."""
    from cnc_model.glod.composition import stack_prompt_embeds
    from cnc_model.glod.prepare import composition_from_spec

    if spec.layout_guidance.enabled and spec.local_prompts and "layout_guidance" in spec.model_fields_set:
        logger.warning("CnCPipeline composes GLoD prompts without layout guidance: the spec's layout_guidance "
                       "(strength %s) is not applied; GLoDPipeline applies it", spec.layout_guidance.strength)
    composition = composition_from_spec(spec, latent_size)
    embeds = stack_prompt_embeds(
        encode(spec.negative_prompt),
        [encode(g.text) for g in spec.global_prompts],
        [encode(lp.text) for lp in spec.local_prompts],
        num_images,
    )
    return composition_plan(composition, embeds, num_images)


def composition_plan(composition: Any, prompt_embeds: torch.Tensor, num_images: int) -> DenoisePlan:
    """The plan of a :class:`~cnc_model.glod.composition.GLoDComposition` over its stacked
    ``[uncond, globals..., locals...]`` embeddings: local rows only in its local step range."""
    return DenoisePlan(
        prompt_embeds,
        num_images,
        lambda i, n: composition.num_blocks(composition.locals_active(i, n)),
        lambda eps, i, n: composition(eps, i, n),
    )
