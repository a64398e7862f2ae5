"""CnC conditions -> one UNet call: input normalisation, context building, the guided forward.

Shared by :class:`~cnc_model.cnc.pipeline_cnc.CnCPipeline` and :mod:`cnc_model.cnc.training`, so that
inference and training run the very same conditioning code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from cnc_model.cnc.soft_guidance import SoftGuidance

ImageLike = PIL.Image.Image | np.ndarray | torch.Tensor


def _to_float_tensor(image: ImageLike, what: str) -> torch.Tensor:
    """One image or a batch -> float ``(B, C, H, W)`` in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535.0
        elif array.dtype == bool:
            array = array.astype(np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:  # H, W, C
            tensor = tensor.permute(2, 0, 1)[None]
        elif tensor.ndim == 4:  # B, H, W, C
            tensor = tensor.permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        tensor = image.float()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
    else:
        raise TypeError(f"{what}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected 1, 3 or 4 channels, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{what}: values must lie in [0, 1] (got {tensor.min().item():.3g}..{tensor.max().item():.3g})")
    return tensor


def prepare_depth(depth: ImageLike, height: int, width: int) -> torch.Tensor:
    """A depth map (PIL, array or tensor in [0, 1], 1 or 3 channels) -> ``(B, 3, height, width)``."""
    tensor = _to_float_tensor(depth, "depth map")[:, :3]
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tensor.shape[-2:] != (height, width):
        tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return tensor.contiguous()


def prepare_mask(mask: ImageLike) -> torch.Tensor:
    """A soft-guidance mask (1 = foreground) -> ``(B, 1, H, W)`` float; any size (resized later)."""
    tensor = _to_float_tensor(mask, "mask")
    return tensor[:, :1] if tensor.shape[1] != 3 else tensor.mean(dim=1, keepdim=True)


def mask_from_depth(fg_depth: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Mask rule when none is given: foreground where the fg depth map exceeds ``threshold`` times
    its per-image maximum (fg depth maps are black outside the object). ``(B, 1, H, W)``."""
    gray = fg_depth.mean(dim=1, keepdim=True)
    peak = gray.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None, None]
    return (gray > threshold * peak).float()


def expand_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile a batch of 1 or n conditions to ``batch`` rows (``batch`` a multiple of n).

    Tiling matches the UNet batch layouts: ``[uncond, text]`` of classifier-free guidance and
    GLoD's ``[uncond, global_1, ..., local_L]``, each block one row per image."""
    n = tensor.shape[0]
    if n == batch:
        return tensor
    if batch % n:
        raise ValueError(f"cannot spread a batch of {n} conditions over {batch} samples")
    return tensor.expand(batch, *tensor.shape[1:]) if n == 1 else tensor.repeat(batch // n, *([1] * (tensor.ndim - 1)))


@dataclass
class CnCConditions:
    """Prepared conditions for one generation (or training) batch; any field may be None.

    ``fg_depth``/``bg_depth``: ``(B or 1, 3, H, W)`` in [0, 1] at pixel resolution.
    ``fg_tokens``/``bg_tokens``: global-fuser tokens ``(B or 1, 4, d)``, already scaled by λ.
    ``mask``: ``(B or 1, 1, h, w)``, 1 = foreground; used only when exemplar tokens exist.
    """

    fg_depth: torch.Tensor | None = None
    bg_depth: torch.Tensor | None = None
    fg_tokens: torch.Tensor | None = None
    bg_tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    depth_scale: float = 1.0
    mask_resize: str = "official"
    """How the mask reaches each attention resolution (:data:`~cnc_model.cnc.soft_guidance.MASK_RESIZE_RULES`)."""

    def per_image(self, num_images_per_prompt: int) -> "CnCConditions":
        """Per-prompt conditions -> per-image ones (``repeat_interleave``, as the prompts are)."""
        if num_images_per_prompt == 1:
            return self

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or x.shape[0] == 1 else x.repeat_interleave(num_images_per_prompt, dim=0)

        return CnCConditions(rep(self.fg_depth), rep(self.bg_depth), rep(self.fg_tokens), rep(self.bg_tokens),
                             rep(self.mask), self.depth_scale, self.mask_resize)  # fmt: skip

    @property
    def has_depth(self) -> bool:
        return self.fg_depth is not None or self.bg_depth is not None

    @property
    def has_exemplars(self) -> bool:
        return self.fg_tokens is not None

    def context(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Text tokens followed by the fg and bg tokens (CnC's 77 + 4 + 4 context)."""
        if not self.has_exemplars:
            return prompt_embeds
        batch = prompt_embeds.shape[0]
        fg = expand_batch(self.fg_tokens.to(prompt_embeds.dtype), batch)
        bg = expand_batch(self.bg_tokens.to(prompt_embeds.dtype), batch)
        return torch.cat([prompt_embeds, fg, bg], dim=1)

    def soft_guidance(self, latent_size: tuple[int, int], batch: int) -> SoftGuidance | None:
        """The per-forward bias cache, or None when there is nothing to guide."""
        if not self.has_exemplars or self.mask is None:
            return None
        mask = self.mask if self.mask.shape[0] == 1 else expand_batch(self.mask, batch)
        return SoftGuidance(mask, latent_size, self.fg_tokens.shape[1], self.bg_tokens.shape[1], self.mask_resize)


def cnc_noise_prediction(
    unet: torch.nn.Module,
    local_fuser: torch.nn.Module | None,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    prompt_embeds: torch.Tensor,
    conditions: CnCConditions,
    soft_guidance: SoftGuidance | None = None,
) -> torch.Tensor:
    """ε prediction of the frozen UNet steered by the local fuser (depth) and the context tokens.

    With no condition this is exactly ``unet(sample, timestep, prompt_embeds)``. A missing one of
    the two depth maps is zeros, the value condition dropout trains for.
    """
    batch = sample.shape[0]
    context = conditions.context(prompt_embeds)
    if soft_guidance is None:
        soft_guidance = conditions.soft_guidance(tuple(sample.shape[-2:]), batch)
    cross_attention_kwargs = {"soft_guidance": soft_guidance} if soft_guidance is not None else None
    residuals = {}
    if conditions.has_depth and local_fuser is not None:
        reference = conditions.fg_depth if conditions.fg_depth is not None else conditions.bg_depth
        fg = conditions.fg_depth if conditions.fg_depth is not None else torch.zeros_like(reference)
        bg = conditions.bg_depth if conditions.bg_depth is not None else torch.zeros_like(reference)
        down, mid = local_fuser(
            sample,
            timestep,
            encoder_hidden_states=context,
            fg_depth=expand_batch(fg, batch),
            bg_depth=expand_batch(bg, batch),
            conditioning_scale=conditions.depth_scale,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=False,
        )
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return unet(
        sample,
        timestep,
        encoder_hidden_states=context,
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
        **residuals,
    )[0]
