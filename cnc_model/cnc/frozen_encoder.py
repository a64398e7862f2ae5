"""The frozen SD UNet's forward for training, as the official CnC code runs it.

The official ``CnCUNetModel.forward`` computes the time embedding, the encoder (input blocks) and
the middle block of the frozen SD UNet under ``torch.no_grad()``; only the decoder (output blocks)
runs with autograd, taking the local fuser's residuals on its skip connections. So the exemplar
tokens reach the loss only through the decoder's cross-attention (and through the local fuser's
own cross-attention in the ``full`` stage), and no activation of the frozen encoder is kept for
backward. :class:`FrozenEncoderUNet` wraps a diffusers ``UNet2DConditionModel`` with that forward
and the same call signature, so :func:`~cnc_model.cnc.conditioning.cnc_noise_prediction` takes it
in place of the UNet. Its output equals the UNet's; only the gradients differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_UNSUPPORTED = ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type")


class FrozenEncoderUNet(nn.Module):
    """``unet`` with its encoder and mid block run without gradient (SD-family UNets only)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        config = unet.config
        used = [k for k in _UNSUPPORTED if config.get(k) is not None]
        if used or config.get("center_input_sample") or unet.mid_block is None:
            raise ValueError(f"FrozenEncoderUNet supports SD-family UNets only (config sets {used or 'mid block/centre'})")
        self.unet = unet

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        """Same arguments and value as ``UNet2DConditionModel.forward(..., return_dict=False)``."""
        unet = self.unet
        upsample_size = None
        forward_upsample_size = any(d % 2**unet.num_upsamplers for d in sample.shape[-2:])
        with torch.no_grad():
            emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            h = unet.conv_in(sample)
            skips: tuple[torch.Tensor, ...] = (h,)
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                   cross_attention_kwargs=cross_attention_kwargs)
                else:
                    h, res = block(hidden_states=h, temb=emb)
                skips += res
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states,
                                   cross_attention_kwargs=cross_attention_kwargs)
            else:
                h = unet.mid_block(h, emb)
        if down_block_additional_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for i, block in enumerate(unet.up_blocks):
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if i < len(unet.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                          upsample_size=upsample_size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return (unet.conv_out(h),)
