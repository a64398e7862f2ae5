"""From a :class:`GLoDSpec` to the tensors a denoising loop needs: regions, composition, layout objects.

Shared by :class:`~cnc_model.glod.pipeline_glod.GLoDPipeline` and any other pipeline (CnC) that
composes GLoD prompts, so the spec means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from cnc_model.glod.composition import GLoDComposition
from cnc_model.glod.layout_guidance import LayoutObject
from cnc_model.glod.regions import box_mask, mask_to_latent
from cnc_model.glod.spec import GLoDSpec
from cnc_model.glod.token_match import find_token_indices


def spec_regions(spec: GLoDSpec, latent_size: tuple[int, int], feather: bool = True) -> torch.Tensor:
    """The local prompts' regions ``(L, 1, h, w)`` at latent resolution.

    Boxes are taken as fractions of the spec's ``width``/``height`` (so they scale to any output
    size); ``spec.feather`` (pixels of the spec frame) becomes latent cells; ``feather=False``
    gives the hard regions (as the layout loss uses them)."""
    h, w = latent_size
    cells = spec.feather * w / spec.width if feather else 0.0
    regions = []
    for local in spec.local_prompts:
        if local.box is not None:
            x0, y0, x1, y1 = local.box
            frac = (x0 / spec.width, y0 / spec.height, x1 / spec.width, y1 / spec.height)
            regions.append(box_mask(frac, latent_size, cells))
        else:
            regions.append(mask_to_latent(local.mask, latent_size, cells))
    if not regions:
        return torch.zeros(0, 1, h, w)
    return torch.stack(regions)[:, None]


def composition_from_spec(spec: GLoDSpec, latent_size: tuple[int, int]) -> GLoDComposition:
    """Weights, regions and local step range of ``spec`` as a :class:`GLoDComposition`."""
    return GLoDComposition(
        global_weights=[g.weight for g in spec.global_prompts],
        local_weights=[lp.weight for lp in spec.local_prompts],
        local_masks=spec_regions(spec, latent_size),
        local_step_range=tuple(spec.local_steps),
    )


def spec_texts(spec: GLoDSpec) -> list[str]:
    """Prompt texts in batch order: globals then locals (the uncond one is ``spec.negative_prompt``)."""
    return [g.text for g in spec.global_prompts] + [lp.text for lp in spec.local_prompts]


def layout_objects(spec: GLoDSpec, tokenizer: Any, latent_size: tuple[int, int], num_images: int = 1) -> list[LayoutObject]:
    """One :class:`LayoutObject` per local prompt; ``rows`` index a batch holding the global
    prompts only (blocks of ``num_images`` rows, in spec order)."""
    hard = spec_regions(spec, latent_size, feather=False)
    objects = []
    for i, local in enumerate(spec.local_prompts):
        g = spec.global_index_of(local)
        tokens = find_token_indices(tokenizer, spec.global_prompts[g].text, local.object)
        objects.append(LayoutObject(rows=slice(g * num_images, (g + 1) * num_images), tokens=tokens, region=hard[i, 0]))
    return objects
