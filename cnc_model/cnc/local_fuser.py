"""Local fuser: depth disentanglement (CnC §3.1) as a ControlNet-style side network.

* Two depth streams (fg, bg), each ``3 -> 32 -> 64 -> 64 -> 64`` channels with two stride-2
  steps, concatenated (128 channels), then one stride-2 extraction conv per UNet level whose
  output passes a zero-initialised conv (:class:`DepthEncoder`). For 512 px images the features
  are at the latent resolutions 64, 32, 16, 8.
* A trainable copy of the UNet's ``conv_in``, time embedding, down blocks and mid block. The
  first ResBlock of each level is an :class:`FDNResnetBlock2D`: its two GroupNorms have no affine
  parameters and are modulated by the level's depth features, ``x * (1 + gamma(f)) + beta(f)``.
* Zero-initialised 1x1 convs on every skip connection and on the mid block; their outputs are
  what diffusers' ``UNet2DConditionModel`` takes as ``down_block_additional_residuals`` and
  ``mid_block_additional_residual``. An untrained fuser therefore leaves SD unchanged.

Channels follow the UNet's config, so the same code serves SD 1.5 and the tiny preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.utils import BaseOutput
from torch import nn

CNC_SD15_INJECT_CHANNELS = (192, 256, 384, 512)
"""Depth-feature channels per level of the official CnC / Uni-ControlNet SD 1.5 adapter."""
STREAM_CHANNELS = (32, 64, 64, 64)
STREAM_STRIDES = (1, 2, 1, 2)

# UNet config entries the copy needs (SD-family UNets: no class / addition embeddings).
UNET_CONFIG_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "only_cross_attention",
    "upcast_attention",
    "resnet_time_scale_shift",
)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (ControlNet's zero convolution)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FDN(nn.Module):
    """Feature denormalisation: GroupNorm without affine, modulated by local features (SPADE)."""

    def __init__(self, channels: int, feature_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.param_free_norm = nn.GroupNorm(groups, channels, eps=eps, affine=False)
        self.conv_gamma = nn.Conv2d(feature_channels, channels, kernel_size=3, padding=1)
        self.conv_beta = nn.Conv2d(feature_channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"depth features {tuple(features.shape[-2:])} do not match activations {tuple(x.shape[-2:])}")
        return self.param_free_norm(x) * (1 + self.conv_gamma(features)) + self.conv_beta(features)


class FDNResnetBlock2D(nn.Module):
    """A diffusers ``ResnetBlock2D`` (default time-embedding norm) whose norms are :class:`FDN`."""

    def __init__(self, resnet: ResnetBlock2D, feature_channels: int) -> None:
        super().__init__()
        if resnet.upsample is not None or resnet.downsample is not None or resnet.time_embedding_norm != "default":
            raise ValueError("FDN supports plain ResnetBlock2D (no up/down sampling, default time norm)")
        groups, eps = resnet.norm1.num_groups, resnet.norm1.eps
        self.norm_in = FDN(resnet.norm1.num_channels, feature_channels, groups, eps)
        self.norm_out = FDN(resnet.norm2.num_channels, feature_channels, resnet.norm2.num_groups, resnet.norm2.eps)
        self.conv1, self.conv2 = resnet.conv1, resnet.conv2
        self.time_emb_proj = resnet.time_emb_proj
        self.conv_shortcut = resnet.conv_shortcut
        self.nonlinearity, self.dropout = resnet.nonlinearity, resnet.dropout
        self.skip_time_act = resnet.skip_time_act
        self.output_scale_factor = resnet.output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm_in(x, features)))
        if self.time_emb_proj is not None:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            h = h + self.time_emb_proj(t)[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm_out(h, features))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


def _depth_stream(in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_channels
    for ch, stride in zip(STREAM_CHANNELS, STREAM_STRIDES):
        layers += [nn.Conv2d(prev, ch, 3, padding=1, stride=stride), nn.SiLU()]
        prev = ch
    return nn.Sequential(*layers)


class DepthEncoder(nn.Module):
    """fg/bg depth maps (pixel resolution) -> one zero-conv'd feature map per UNet level."""

    def __init__(self, depth_channels: int, inject_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.fg_stream = _depth_stream(depth_channels)
        self.bg_stream = _depth_stream(depth_channels)
        prev = 2 * STREAM_CHANNELS[-1]
        self.extractors = nn.ModuleList()
        self.zero_convs = nn.ModuleList()
        for ch in inject_channels:
            self.extractors.append(nn.Sequential(nn.Conv2d(prev, ch, 3, padding=1, stride=2), nn.SiLU()))
            self.zero_convs.append(zero_module(nn.Conv2d(ch, ch, 3, padding=1)))
            prev = ch

    def forward(self, fg_depth: torch.Tensor, bg_depth: torch.Tensor) -> list[torch.Tensor]:
        h = torch.cat([self.fg_stream(fg_depth), self.bg_stream(bg_depth)], dim=1)
        features = []
        for extractor, zero_conv in zip(self.extractors, self.zero_convs):
            h = extractor(h)
            features.append(zero_conv(h))
        return features


@dataclass
class LocalFuserOutput(BaseOutput):
    """Residuals for ``UNet2DConditionModel(..., down_block_additional_residuals=...,
    mid_block_additional_residual=...)``."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class LocalFuser(ModelMixin, ConfigMixin):
    """The CnC local fuser for an SD-family UNet. Build it with :meth:`from_unet`.

    Depth maps are ``(B, depth_channels, H, W)`` at pixel resolution (8x the latent, as for SD's
    VAE), values in [0, 1].
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool | tuple[bool, ...] = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        depth_channels: int = 3,
        inject_channels: tuple[int, ...] | None = CNC_SD15_INJECT_CHANNELS,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        levels = len(block_out_channels)
        inject_channels = tuple(inject_channels or block_out_channels)
        if len(inject_channels) != levels or len(down_block_types) != levels:
            raise ValueError(f"need one inject channel and one down block per level ({levels})")
        # diffusers' historical naming: `attention_head_dim` holds the number of heads for SD.
        num_attention_heads = num_attention_heads or attention_head_dim
        per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * levels  # noqa: E731
        heads, head_dims = per_level(num_attention_heads), per_level(attention_head_dim)
        tlayers, only_cross = per_level(transformer_layers_per_block), per_level(only_cross_attention)

        time_embed_dim = block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        self.depth_encoder = DepthEncoder(depth_channels, inject_channels)

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([self._zero_conv(block_out_channels[0])])
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            last = i == levels - 1
            block = get_down_block(
                block_type,
                num_layers=layers_per_block,
                transformer_layers_per_block=tlayers[i],
                in_channels=in_ch,
                out_channels=out_ch,
                temb_channels=time_embed_dim,
                add_downsample=not last,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
                num_attention_heads=heads[i],
                attention_head_dim=head_dims[i] if head_dims[i] is not None else out_ch,
                downsample_padding=downsample_padding,
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross[i],
                upcast_attention=upcast_attention,
                resnet_time_scale_shift=resnet_time_scale_shift,
            )
            block.resnets[0] = FDNResnetBlock2D(block.resnets[0], inject_channels[i])
            self.down_blocks.append(block)
            for _ in range(layers_per_block + (0 if last else 1)):
                self.controlnet_down_blocks.append(self._zero_conv(out_ch))

        self.mid_block = UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=tlayers[-1],
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads[-1],
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_mid_block = self._zero_conv(block_out_channels[-1])

    @staticmethod
    def _zero_conv(channels: int) -> nn.Conv2d:
        return zero_module(nn.Conv2d(channels, channels, kernel_size=1))

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        inject_channels: tuple[int, ...] | None = None,
        load_weights_from_unet: bool = True,
        depth_channels: int = 3,
    ) -> "LocalFuser":
        """A local fuser shaped after ``unet``, its copy initialised from ``unet``'s weights.

        ``inject_channels`` defaults to :data:`CNC_SD15_INJECT_CHANNELS` for a 4-level UNet with
        SD 1.5's widths (so official checkpoints convert), else to the UNet's block widths.
        """
        config = {k: unet.config[k] for k in UNET_CONFIG_KEYS if k in unet.config}
        if inject_channels is None:
            sd15 = tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
            inject_channels = CNC_SD15_INJECT_CHANNELS if sd15 else tuple(unet.config.block_out_channels)
        fuser = cls(**config, depth_channels=depth_channels, inject_channels=tuple(inject_channels))
        if load_weights_from_unet:
            fuser.load_unet_weights(unet)
        if unet.dtype != fuser.dtype:
            fuser = fuser.to(dtype=unet.dtype)
        return fuser.to(unet.device)

    def load_unet_weights(self, unet: nn.Module) -> None:
        """Copy ``conv_in``, time embedding, down blocks and mid block from ``unet`` (the FDN
        blocks take the convolutions; their norms have no affine weights to take)."""
        self.conv_in.load_state_dict(unet.conv_in.state_dict())
        self.time_proj.load_state_dict(unet.time_proj.state_dict())
        self.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        self.mid_block.load_state_dict(unet.mid_block.state_dict())
        source = unet.down_blocks.state_dict()
        target = self.down_blocks.state_dict()
        for key in target:
            if key in source:
                target[key] = source[key]
        self.down_blocks.load_state_dict(target)

    @staticmethod
    def _direct(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    @staticmethod
    def _checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Recompute ``module`` in backward instead of keeping its activations (training memory)."""
        return torch.utils.checkpoint.checkpoint(lambda *a: module(*a, **kwargs), *args, use_reentrant=False)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        fg_depth: torch.Tensor,
        bg_depth: torch.Tensor,
        conditioning_scale: float = 1.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> LocalFuserOutput | tuple:
        """Residuals for the frozen UNet, one per skip connection plus one for the mid block."""
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float32, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))

        features = self.depth_encoder(fg_depth.to(sample.dtype), bg_depth.to(sample.dtype))
        h = self.conv_in(sample)
        res_samples = [h]
        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else self._direct
        for block, level_features in zip(self.down_blocks, features):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = run(resnet, h, emb, level_features) if j == 0 else run(resnet, h, emb)
                if attentions is not None:
                    h = run(attentions[j], h, encoder_hidden_states=encoder_hidden_states,
                            cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
                res_samples.append(h)
            if block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    h = downsampler(h)
                res_samples.append(h)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)

        down = tuple(conv(r) * conditioning_scale for conv, r in zip(self.controlnet_down_blocks, res_samples))
        mid = self.controlnet_mid_block(h) * conditioning_scale
        if not return_dict:
            return down, mid
        return LocalFuserOutput(down_block_res_samples=down, mid_block_res_sample=mid)
