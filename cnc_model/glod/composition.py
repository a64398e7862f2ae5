"""GLoD's noise composition: several prompts' ε predictions from one batched UNet call -> ε̂.

The UNet batch is laid out in blocks of ``N`` rows (``N`` images generated together), one block per
prompt, in this order::

    [ uncond | global_1 | ... | global_G | local_1 | ... | local_L ]      (N rows each)

which is what ``torch.cat([uncond, g_1, ..., l_L])`` of per-prompt ``(N, ...)`` tensors gives
(:func:`stack_prompt_embeds` builds it), and, with G = 1 and L = 0, exactly the ``[uncond, text]``
layout of diffusers' classifier-free guidance. Then

    ε̂ = ε_u + Σ_g w_g (ε_g − ε_u) + Σ_l w_l M_l ⊙ (ε_l − ε_u)

with ``M_l`` the l-th local region at latent resolution (values in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


def compose_noise(
    noise_pred: torch.Tensor,
    global_weights: Sequence[float] | torch.Tensor,
    local_weights: Sequence[float] | torch.Tensor = (),
    local_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compose a batched UNet output into GLoD's ε̂.

    Args:
        noise_pred: ``(N * (1 + G + L), C, h, w)``, the UNet output for the batch laid out as
            ``[uncond, global_1..G, local_1..L]`` in blocks of N rows (see the module docstring).
        global_weights: the G global weights ``w_g`` (G >= 1; a single global prompt with
            weight s is classifier-free guidance with scale s, bit for bit).
        local_weights: the L local weights ``w_l``; L = 0 (the default) means no local rows in
            ``noise_pred`` (e.g. outside the local step range: leave the local rows out of the batch).
        local_masks: the L regions at latent resolution, ``(L, h, w)``, ``(L, 1, h, w)`` or
            ``(L, N, 1, h, w)`` (per image), values in [0, 1]. Required when L > 0.

    Returns:
        ``(N, C, h, w)``: ``ε_u + Σ w_g (ε_g − ε_u) + Σ w_l M_l ⊙ (ε_l − ε_u)``.
    """
    num_globals, num_locals = len(global_weights), len(local_weights)
    if num_globals < 1:
        raise ValueError("GLoD needs at least one global prompt")
    blocks = 1 + num_globals + num_locals
    if noise_pred.shape[0] % blocks:
        raise ValueError(f"noise_pred has {noise_pred.shape[0]} rows, not a multiple of 1 + {num_globals} "
                         f"globals + {num_locals} locals")
    chunks = noise_pred.chunk(blocks)
    eps_u = chunks[0]
    eps = eps_u
    for w, eps_g in zip(_floats(global_weights), chunks[1:1 + num_globals]):
        eps = eps + w * (eps_g - eps_u)
    if num_locals:
        if local_masks is None or local_masks.shape[0] != num_locals:
            got = None if local_masks is None else tuple(local_masks.shape)
            raise ValueError(f"{num_locals} local prompts need {num_locals} local masks, got {got}")
        masks = local_masks.to(device=eps.device, dtype=eps.dtype)
        if masks.ndim == 3:
            masks = masks[:, None]
        for w, mask, eps_l in zip(_floats(local_weights), masks, chunks[1 + num_globals:]):
            eps = eps + w * mask * (eps_l - eps_u)
    return eps


def _floats(weights: Sequence[float] | torch.Tensor) -> list[float]:
    return [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]


def stack_prompt_embeds(
    uncond: torch.Tensor,
    globals_: Sequence[torch.Tensor],
    locals_: Sequence[torch.Tensor] = (),
    num_images: int = 1,
) -> torch.Tensor:
    """The batched text condition ``[uncond, globals..., locals...]``, each repeated ``num_images``
    times (a block of N rows per prompt), matching :func:`compose_noise`'s layout.

    Each input is ``(1, T, D)`` or already ``(N, T, D)``."""
    rows = []
    for emb in (uncond, *globals_, *locals_):
        rows.append(emb.expand(num_images, *emb.shape[1:]) if emb.shape[0] == 1 else emb)
    return torch.cat(rows)


@dataclass
class GLoDComposition:
    """A whole generation's composition settings, for pipelines that loop over steps.

    ``local_masks`` is ``(L, 1, h, w)`` at latent resolution; local guidance applies in steps
    ``i`` with ``start <= i / num_steps < end`` (``local_step_range``), and outside it the local rows
    need not be computed at all (:meth:`num_blocks` tells how many prompt blocks a step needs).

    Typical loop::

        comp = GLoDComposition([7.5], [5.0], masks, (0.0, 0.8))
        for i, t in enumerate(timesteps):
            active = comp.locals_active(i, len(timesteps))
            embeds = all_embeds if active else all_embeds[: comp.num_blocks(False) * N]
            x = torch.cat([latents] * comp.num_blocks(active))
            eps = unet(scheduler.scale_model_input(x, t), t, embeds).sample
            eps_hat = comp(eps, i, len(timesteps))
    """

    global_weights: list[float]
    local_weights: list[float] = field(default_factory=list)
    local_masks: torch.Tensor | None = None
    local_step_range: tuple[float, float] = (0.0, 1.0)

    def locals_active(self, step_index: int, num_steps: int) -> bool:
        """Whether step ``step_index`` of ``num_steps`` gets local guidance."""
        if not self.local_weights:
            return False
        start, end = self.local_step_range
        # first step at or after each bound, with a tolerance for fractions like 0.14 * 50 = 7.000000000000001
        first, stop = (math.ceil(f * num_steps - 1e-9) for f in (start, end))
        return first <= step_index < stop

    def num_blocks(self, locals_active: bool) -> int:
        """Prompt blocks (of N rows) in the UNet batch: 1 + G (+ L when locals are active)."""
        return 1 + len(self.global_weights) + (len(self.local_weights) if locals_active else 0)

    def __call__(self, noise_pred: torch.Tensor, step_index: int, num_steps: int) -> torch.Tensor:
        """ε̂ for this step. ``noise_pred`` holds the local rows iff :meth:`locals_active`."""
        if self.locals_active(step_index, num_steps):
            return compose_noise(noise_pred, self.global_weights, self.local_weights, self.local_masks)
        return compose_noise(noise_pred, self.global_weights)
