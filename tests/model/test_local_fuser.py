"""Local fuser: shapes follow the UNet config, ControlNet-style init, zero outputs, FDN maths."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel

from cnc_model.cnc.local_fuser import FDN, LocalFuser
from cnc_model.tiny import tiny_sd_components, tiny_unet_config


def three_level_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = tiny_unet_config() | dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
    )
    return UNet2DConditionModel(**config)


@pytest.mark.parametrize("make_unet", [lambda: tiny_sd_components()["unet"], three_level_unet])
def test_residuals_match_the_unet_skips_and_start_at_zero(make_unet):
    unet = make_unet()
    fuser = LocalFuser.from_unet(unet)
    sample, context = torch.randn(2, 4, 8, 16), torch.randn(2, 77, 32)
    depth = torch.rand(2, 3, 64, 128)
    down, mid = fuser(sample, 5, context, depth, depth.flip(-1), return_dict=False)
    # one residual per skip connection the UNet keeps: conv_in + every resnet + every downsampler
    levels, layers = len(unet.config.block_out_channels), unet.config.layers_per_block
    assert len(down) == 1 + levels * layers + (levels - 1)
    assert all((r == 0).all() for r in down) and (mid == 0).all()
    with torch.no_grad():
        plain = unet(sample, 5, context).sample
        fused = unet(sample, 5, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(plain, fused)
    assert [f.shape[1] for f in fuser.depth_encoder(depth, depth)] == list(unet.config.block_out_channels)


def test_copy_is_initialised_from_the_unet():
    unet = tiny_sd_components()["unet"]
    fuser = LocalFuser.from_unet(unet)
    assert torch.equal(fuser.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(fuser.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert torch.equal(fuser.down_blocks[0].resnets[1].norm1.weight, unet.down_blocks[0].resnets[1].norm1.weight)
    assert torch.equal(
        fuser.down_blocks[0].attentions[1].transformer_blocks[0].attn2.to_k.weight,
        unet.down_blocks[0].attentions[1].transformer_blocks[0].attn2.to_k.weight,
    )
    assert torch.equal(fuser.mid_block.resnets[1].conv2.weight, unet.mid_block.resnets[1].conv2.weight)
    assert fuser.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()  # a copy, not shared


def test_fdn_is_spade_modulation():
    torch.manual_seed(0)
    fdn = FDN(channels=32, feature_channels=8, groups=4)
    x, f = torch.randn(2, 32, 5, 7), torch.randn(2, 8, 5, 7)
    normalized = torch.nn.functional.group_norm(x, 4, eps=1e-5)
    expected = normalized * (1 + fdn.conv_gamma(f)) + fdn.conv_beta(f)
    torch.testing.assert_close(fdn(x, f), expected)
    assert not list(fdn.param_free_norm.parameters())  # no affine parameters


def test_depth_reaches_the_output_once_zero_convs_learn():
    unet = tiny_sd_components()["unet"]
    fuser = LocalFuser.from_unet(unet)
    with torch.no_grad():
        for conv in [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block, *fuser.depth_encoder.zero_convs]:
            conv.weight.normal_(0, 0.05)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    a = fuser(sample, 5, context, torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)).mid_block_res_sample
    b = fuser(sample, 5, context, torch.ones(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)).mid_block_res_sample
    c = fuser(sample, 5, context, torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)).mid_block_res_sample
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4 and (b - c).abs().max() > 1e-4


def test_inject_channels_default_to_the_reference_or_the_block_widths():
    assert inspect.signature(LocalFuser.__init__).parameters["inject_channels"].default == (192, 256, 384, 512)
    fuser = LocalFuser(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=16, inject_channels=None)
    assert [c[0].out_channels for c in fuser.depth_encoder.extractors] == [32, 32, 64, 64]
    fdn = fuser.down_blocks[2].resnets[0].norm_in
    assert fdn.conv_gamma.in_channels == 64 and fdn.conv_gamma.out_channels == 32  # features -> block input width


def test_depth_size_mismatch_is_reported():
    unet = tiny_sd_components()["unet"]
    fuser = LocalFuser.from_unet(unet)
    with pytest.raises(ValueError, match="do not match"):
        fuser(torch.randn(1, 4, 8, 8), 5, torch.randn(1, 77, 32), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_save_load_round_trip(tmp_path):
    fuser = LocalFuser.from_unet(tiny_sd_components()["unet"])
    fuser.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = LocalFuser.from_pretrained(tmp_path)
    assert tuple(loaded.config.inject_channels) == tuple(fuser.config.inject_channels) == (32, 64)
    for (k, a), (_, b) in zip(fuser.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
