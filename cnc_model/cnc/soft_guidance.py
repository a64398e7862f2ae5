"""Soft guidance: fg exemplar tokens attend only inside the mask, bg tokens only outside it.

CnC appends ``4`` fg and ``4`` bg tokens after the text tokens of the cross-attention context.
Soft guidance adds an attention bias to the cross-attention logits: ``0`` for text tokens
everywhere, ``0`` for fg tokens where the mask is 1 and for bg tokens where it is 0, and the most
negative float elsewhere (the reference implementation's ``masked_fill``, written as a bias).

The bias depends only on the mask, the attention resolution and the token layout, so
:class:`SoftGuidance` builds it once per resolution and shares it with every cross-attention
layer of that resolution, in the frozen UNet and in the local fuser's copy alike. Its shape is
``(batch or 1, 1, queries, keys)``: it broadcasts over heads, so no per-head copies exist.

Use: install :class:`SoftGuidanceAttnProcessor` on a UNet (``unet.set_attn_processor``) and pass
``cross_attention_kwargs={"soft_guidance": SoftGuidance(mask, latent_size)}`` to its forward.
Without that argument the processor is exactly diffusers' ``AttnProcessor2_0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

NUM_EXEMPLAR_TOKENS = 4
"""Tokens per exemplar (fg and bg each) produced by the global fuser."""

MASK_RESIZE_RULES = ("official", "area")
"""How the mask reaches an attention resolution: ``official`` = the reference's bicubic resize
without antialias, then any non-zero value is foreground (edges dilate, thin objects survive);
``area`` = area average, then ``>= 0.5`` (ours: no ringing, but a thin object can vanish)."""


def attention_resolutions(latent_size: tuple[int, int], num_levels: int = 8) -> list[tuple[int, int]]:
    """Spatial sizes of a UNet's levels: the latent size, then halved with ceil as stride-2 convs do."""
    h, w = latent_size
    sizes = [(h, w)]
    for _ in range(num_levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


class SoftGuidance:
    """Per-forward soft-guidance state: the mask and a cache of biases keyed by resolution.

    Args:
        mask: ``(B or 1, 1, H, W)`` or ``(B or 1, H, W)`` tensor, 1 = foreground. Any size; it is
            resized to each attention resolution by ``mask_resize``.
        latent_size: ``(h, w)`` of the UNet input, used to recover the 2-D shape of a flattened
            query sequence.
        num_fg_tokens, num_bg_tokens: exemplar tokens at the END of the context (fg then bg).
        mask_resize: ``"official"`` (default: bicubic without antialias, any non-zero value is
            foreground, as the reference's ``MaskedCrossAttention``) or ``"area"`` (area average,
            then ``>= 0.5``); see :data:`MASK_RESIZE_RULES`.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        latent_size: tuple[int, int],
        num_fg_tokens: int = NUM_EXEMPLAR_TOKENS,
        num_bg_tokens: int = NUM_EXEMPLAR_TOKENS,
        mask_resize: str = "official",
    ) -> None:
        if mask_resize not in MASK_RESIZE_RULES:
            raise ValueError(f"mask_resize must be one of {MASK_RESIZE_RULES}, got {mask_resize!r}")
        self.mask_resize = mask_resize
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}")
        self.mask = mask.float()
        self.num_fg_tokens = num_fg_tokens
        self.num_bg_tokens = num_bg_tokens
        self._size_of_length = {h * w: (h, w) for h, w in reversed(attention_resolutions(latent_size))}
        self._cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def num_builds(self) -> int:
        """How many biases were built so far (one per resolution, whatever the layer count)."""
        return len(self._cache)

    def resized_mask(self, size: tuple[int, int]) -> torch.Tensor:
        """Binary mask at ``size``: ``(B or 1, h*w)`` bool, True = foreground."""
        if self.mask_resize == "area":
            return (F.interpolate(self.mask, size=size, mode="area") >= 0.5).flatten(1)
        resized = F.interpolate(self.mask, size=size, mode="bicubic", align_corners=False, antialias=False)
        return (resized != 0).flatten(1)

    def bias(self, query_length: int, key_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive bias ``(B or 1, 1, query_length, key_length)`` for one attention call."""
        key = (query_length, key_length, dtype, device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        size = self._size_of_length.get(query_length)
        if size is None:
            raise ValueError(f"query length {query_length} matches no resolution of the latent {self._size_of_length}")
        num_text = key_length - self.num_fg_tokens - self.num_bg_tokens
        if num_text < 0:
            raise ValueError(f"context of {key_length} tokens is shorter than the exemplar tokens")
        fg = self.resized_mask(size).to(device)  # (B, N)
        allowed = torch.ones(fg.shape[0], query_length, key_length, dtype=torch.bool, device=device)
        allowed[:, :, num_text : num_text + self.num_fg_tokens] = fg[:, :, None]
        allowed[:, :, num_text + self.num_fg_tokens :] = ~fg[:, :, None]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        bias.masked_fill_(~allowed, torch.finfo(dtype).min)
        bias = bias[:, None]  # broadcast over heads
        self._cache[key] = bias
        return bias


class SoftGuidanceAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` plus the soft-guidance bias on cross-attention layers.

    Self-attention, and any call without a ``soft_guidance`` argument, runs the parent processor
    unchanged, so a UNet using this processor is bit-identical to the default one until a mask
    is given.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        soft_guidance: SoftGuidance | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if soft_guidance is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self._guided(attn, hidden_states, encoder_hidden_states, attention_mask, temb, soft_guidance)

    @staticmethod
    def _guided(
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        soft_guidance: SoftGuidance,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, query_length, _ = hidden_states.shape
        key_length = encoder_hidden_states.shape[1]

        bias = soft_guidance.bias(query_length, key_length, hidden_states.dtype, hidden_states.device)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            bias = bias + attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_soft_guidance(model: torch.nn.Module) -> None:
    """Put one shared :class:`SoftGuidanceAttnProcessor` on every attention layer of ``model``."""
    processor = SoftGuidanceAttnProcessor()
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
