"""The FDN ResBlock is diffusers' ``ResnetBlock2D`` with depth-modulated norms, written out by hand:
with silent depth features (zero gamma and beta convs) it is the wrapped block bit for bit, and with
live ones each norm is ``GroupNorm(x) * (1 + gamma(f)) + beta(f)`` with its own groups. The two norms
have different group counts and the block has a shortcut, a time projection and an output scale,
so a swapped norm, a skipped activation or a dropped scale shows. Written to kill the mutants of
``local_fuser.py`` that survived ``make mutants`` (docs/testing.md). float64, seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from cnc_model.cnc.local_fuser import FDNResnetBlock2D

IN, OUT, TEMB, FEAT, EPS = 8, 16, 12, 6, 1e-3


def _block(skip_time_act: bool, temb_channels: int | None) -> tuple[ResnetBlock2D, FDNResnetBlock2D]:
    torch.manual_seed(0)
    resnet = ResnetBlock2D(in_channels=IN, out_channels=OUT, temb_channels=temb_channels, groups=2, groups_out=4,
                           eps=EPS, output_scale_factor=2.0, skip_time_act=skip_time_act).double().eval()
    fdn = FDNResnetBlock2D(resnet, FEAT).double().eval()
    return resnet, fdn


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, IN, 5, 7, generator=gen, dtype=torch.float64)
    temb = torch.randn(2, TEMB, generator=gen, dtype=torch.float64)
    features = torch.randn(2, FEAT, 5, 7, generator=gen, dtype=torch.float64)
    return x, temb, features


@pytest.mark.parametrize("skip_time_act, temb_channels", [(False, TEMB), (True, TEMB), (False, None)])
def test_silent_features_give_the_wrapped_resnet_block(skip_time_act: bool, temb_channels: int | None) -> None:
    resnet, fdn = _block(skip_time_act, temb_channels)
    x, temb, features = _inputs()
    temb = temb if temb_channels else None
    with torch.no_grad():
        for norm in (fdn.norm_in, fdn.norm_out):
            for conv in (norm.conv_gamma, norm.conv_beta):
                conv.weight.zero_()
                conv.bias.zero_()
        torch.testing.assert_close(fdn(x, temb, features), resnet(x, temb), rtol=0, atol=1e-12)


@pytest.mark.parametrize("skip_time_act", [False, True])
def test_live_features_modulate_each_norm_with_its_own_groups(skip_time_act: bool) -> None:
    resnet, fdn = _block(skip_time_act, TEMB)
    x, temb, f = _inputs()

    def fdn_norm(h: torch.Tensor, norm, groups: int) -> torch.Tensor:
        return F.group_norm(h, groups, eps=EPS) * (1 + norm.conv_gamma(f)) + norm.conv_beta(f)

    with torch.no_grad():
        h = resnet.conv1(F.silu(fdn_norm(x, fdn.norm_in, 2)))
        h = h + resnet.time_emb_proj(temb if skip_time_act else F.silu(temb))[:, :, None, None]
        h = resnet.conv2(F.silu(fdn_norm(h, fdn.norm_out, 4)))
        want = (resnet.conv_shortcut(x) + h) / 2.0
        got = fdn(x, temb, f)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - resnet(x, temb)).abs().max() > 1e-3  # the features do act


def test_the_local_fuser_scales_by_one_unless_told() -> None:
    """``conditioning_scale`` defaults to 1: the residuals of a call without it equal a call with 1.0."""
    from cnc_model.cnc.local_fuser import LocalFuser
    from cnc_model.tiny import tiny_sd_components

    fuser = LocalFuser.from_unet(tiny_sd_components(0)["unet"]).eval()
    with torch.no_grad():
        for conv in [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block, *fuser.depth_encoder.zero_convs]:
            conv.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(4)
        args = (torch.randn(1, 4, 8, 8, generator=gen), 5, torch.randn(1, 77, 32, generator=gen),
                torch.rand(1, 3, 64, 64, generator=gen), torch.rand(1, 3, 64, 64, generator=gen))
        default, one = fuser(*args).mid_block_res_sample, fuser(*args, conditioning_scale=1.0).mid_block_res_sample
    assert default.abs().max() > 1e-4 and torch.equal(default, one)
