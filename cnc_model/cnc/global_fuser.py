"""Global fuser: CLIP image embeddings of the fg and bg exemplars -> 4 context tokens each.

Each stream is LayerNorm -> GEGLU feed-forward d -> 2d (dropout 0.1) -> LayerNorm -> GEGLU
feed-forward 2d -> 4d (dropout 0.3), reshaped to 4 tokens of width d, with d the UNet's
cross-attention width (CnC §3.3; the reference implementation's layer sizes). If the image
embedding width differs from d, a linear projection comes first (not needed for SD 1.5 +
CLIP ViT-L/14, where both are 768).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class GlobalFuserStream(nn.Module):
    """One exemplar stream: ``(B, d)`` embedding -> ``(B, num_tokens, d)`` tokens."""

    def __init__(self, dim: int, num_tokens: int = 4, dropouts: tuple[float, float] = (0.1, 0.3)) -> None:
        super().__init__()
        if num_tokens % 2:
            raise ValueError("num_tokens must be even (the first stage doubles the width)")
        self.dim, self.num_tokens = dim, num_tokens
        hidden = dim * 2
        self.norm1 = nn.LayerNorm(dim)
        self.ff1 = FeedForward(dim, dim_out=hidden, mult=4, dropout=dropouts[0], activation_fn="geglu")
        self.norm2 = nn.LayerNorm(hidden)
        # both feed-forwards have an inner width of 4x their input, as in the reference
        self.ff2 = FeedForward(hidden, dim_out=dim * num_tokens, mult=4, dropout=dropouts[1], activation_fn="geglu")

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.ff1(self.norm1(embeds))
        x = self.ff2(self.norm2(x))
        return x.reshape(x.shape[0], self.num_tokens, self.dim)


class GlobalFuser(ModelMixin, ConfigMixin):
    """fg and bg exemplar streams. ``forward(fg_embeds, bg_embeds) -> (fg_tokens, bg_tokens)``.

    Args:
        cross_attention_dim: width d of the UNet's cross-attention context.
        image_embed_dim: width of the CLIP image embeddings (projected to d when different).
        num_tokens: tokens per exemplar (4 in CnC).
    """

    @register_to_config
    def __init__(
        self,
        cross_attention_dim: int = 768,
        image_embed_dim: int = 768,
        num_tokens: int = 4,
        dropouts: tuple[float, float] = (0.1, 0.3),
    ) -> None:
        super().__init__()
        d = cross_attention_dim
        self.proj_in = nn.Linear(image_embed_dim, d) if image_embed_dim != d else None
        self.fg_stream = GlobalFuserStream(d, num_tokens, tuple(dropouts))
        self.bg_stream = GlobalFuserStream(d, num_tokens, tuple(dropouts))

    def forward(self, fg_embeds: torch.Tensor, bg_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, image_embed_dim)`` twice -> ``(B, num_tokens, d)`` twice."""
        if self.proj_in is not None:
            fg_embeds, bg_embeds = self.proj_in(fg_embeds), self.proj_in(bg_embeds)
        return self.fg_stream(fg_embeds), self.bg_stream(bg_embeds)

    @classmethod
    def from_unet(cls, unet: nn.Module, image_embed_dim: int | None = None) -> "GlobalFuser":
        """A fresh fuser sized for ``unet`` (its cross-attention width)."""
        d = unet.config.cross_attention_dim
        return cls(cross_attention_dim=d, image_embed_dim=image_embed_dim or d)
