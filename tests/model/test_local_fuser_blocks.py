"""The local fuser's parts written out by hand, to kill the mutants of ``local_fuser.py`` that
survived ``make mutants`` (docs/testing.md). float64, seeded.

* The FDN ResBlock is diffusers' ``ResnetBlock2D`` with depth-modulated norms: with silent depth
  features it is the wrapped block bit for bit; with live ones each norm is
  ``GroupNorm(x) * (1 + gamma(f)) + beta(f)`` with its own groups (the two norms have different
  group counts, the block a shortcut, a time projection and an output scale).
* With FDN norms that reproduce the UNet's and identity zero convs, the fuser's residuals are the
  UNet's own skips and mid output (diffusers' blocks called directly) times ``conditioning_scale``.
* The depth encoder is the official layout, computed with ``F.conv2d``.
* Gradient checkpointing, ``from_unet``'s dtype and depth channels, the error texts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from cnc_model.cnc.local_fuser import FDN, DepthEncoder, FDNResnetBlock2D, LocalFuser
from cnc_model.tiny import tiny_sd_components

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
    fuser = LocalFuser.from_unet(tiny_sd_components(0)["unet"]).eval()
    with torch.no_grad():
        for conv in [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block, *fuser.depth_encoder.zero_convs]:
            conv.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(4)
        args = (torch.randn(1, 4, 8, 8, generator=gen), 5, torch.randn(1, 77, 32, generator=gen),
                torch.rand(1, 3, 64, 64, generator=gen), torch.rand(1, 3, 64, 64, generator=gen))
        default, one = fuser(*args).mid_block_res_sample, fuser(*args, conditioning_scale=1.0).mid_block_res_sample
    assert default.abs().max() > 1e-4 and torch.equal(default, one)


class _GainProcessor(AttnProcessor2_0):
    """Scales every attention output by ``gain`` (a ``cross_attention_kwargs`` entry), so a call
    that drops ``cross_attention_kwargs`` on its way to an attention layer shows."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain


def _set_gain_processors(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(_GainProcessor())


def _fuser_that_copies_the_unet() -> tuple[UNet2DConditionModel, LocalFuser]:
    """A float64 tiny UNet with perturbed norms and a fuser whose FDN norms reproduce the UNet's
    affine ones (zero gamma/beta kernels, biases ``weight - 1`` and ``bias``) and whose zero convs
    are identities: its residuals are then the UNet's own skips and mid-block output."""
    unet = tiny_sd_components(0)["unet"].eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    # copied in float32 (exact), then both in float64
    fuser = LocalFuser.from_unet(unet).double().eval()
    unet = unet.double()
    with torch.no_grad():
        for level, block in enumerate(fuser.down_blocks):
            plain = unet.down_blocks[level].resnets[0]
            for fdn, norm in ((block.resnets[0].norm_in, plain.norm1), (block.resnets[0].norm_out, plain.norm2)):
                fdn.conv_gamma.weight.zero_()
                fdn.conv_beta.weight.zero_()
                fdn.conv_gamma.bias.copy_(norm.weight - 1)
                fdn.conv_beta.bias.copy_(norm.bias)
        for conv in [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block]:
            conv.weight.copy_(torch.eye(conv.in_channels, dtype=torch.float64)[:, :, None, None])
            conv.bias.zero_()
    _set_gain_processors(unet)
    _set_gain_processors(fuser)
    return unet, fuser


def _unet_skips(unet: UNet2DConditionModel, sample, timesteps, context, kwargs):
    """diffusers' own down path: every skip the UNet keeps, and the mid block's output."""
    emb = unet.time_embedding(unet.time_proj(timesteps).to(sample.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(h, emb, encoder_hidden_states=context, cross_attention_kwargs=kwargs)
        else:
            h, res = block(h, emb)
        skips += res
    return skips, unet.mid_block(h, emb, encoder_hidden_states=context, cross_attention_kwargs=kwargs)


@pytest.mark.parametrize("timestep, per_sample", [
    (7, (7, 7)), (7.0, (7, 7)), (torch.tensor(7), (7, 7)), (torch.tensor([3, 700]), (3, 700)),
])
def test_the_fuser_copy_computes_the_unets_skips_scaled(timestep, per_sample) -> None:
    """With norms and zero convs that make the fuser a copy of the UNet's down path, its residuals
    are ``conditioning_scale`` times the UNet's skips, in order, and its mid residual the mid
    block's output: the timestep (a number, a 0-d tensor, one per sample), the text context and
    ``cross_attention_kwargs`` reach every block, every resnet, attention and downsampler is run
    once, in order; float32 depth maps are cast to the sample's dtype."""
    unet, fuser = _fuser_that_copies_the_unet()
    gen = torch.Generator().manual_seed(6)
    sample = torch.randn(2, 4, 8, 16, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 77, 32, generator=gen, dtype=torch.float64)
    # float32 depth maps, as the pipelines prepare them: the fuser casts them to the sample's dtype
    fg, bg = (torch.rand(2, 3, 64, 128, generator=gen) for _ in range(2))
    kwargs = {"gain": 0.7}
    with torch.no_grad():
        skips, mid = _unet_skips(unet, sample, torch.tensor(per_sample), context, kwargs)
        out = fuser(sample, timestep, context, fg, bg, conditioning_scale=0.5, cross_attention_kwargs=kwargs)
        _, mid_without_kwargs = _unet_skips(unet, sample, torch.tensor(per_sample), context, None)
    assert (mid_without_kwargs - mid).abs().max() > 1e-3  # the gain does act
    assert len(out.down_block_res_samples) == len(skips) == 1 + 2 * 2 + 1
    for got, want in zip(out.down_block_res_samples, skips):
        torch.testing.assert_close(got, 0.5 * want, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.mid_block_res_sample, 0.5 * mid, rtol=0, atol=1e-10)


def test_gradient_checkpointing_runs_only_when_enabled_and_training_and_changes_nothing() -> None:
    """``enable_gradient_checkpointing`` makes a forward with gradients run every resnet and
    attention through ``_checkpointed``; without it, or under ``no_grad``, nothing is
    checkpointed. Checkpointed or not, outputs and gradients are the same."""
    fuser = LocalFuser.from_unet(tiny_sd_components(0)["unet"]).double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for conv in [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block, *fuser.depth_encoder.zero_convs]:
            conv.weight.normal_(0, 0.05, generator=gen)
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return LocalFuser._checkpointed(module, *args, **kwargs)

    fuser._checkpointed = spy
    sample = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 77, 32, generator=gen, dtype=torch.float64)
    fg, bg = (torch.rand(2, 3, 64, 64, generator=gen, dtype=torch.float64) for _ in range(2))
    kwargs = {"gain": 0.7}
    _set_gain_processors(fuser)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        fuser.zero_grad()
        down, mid = fuser(sample, torch.tensor([3, 700]), context, fg, bg, cross_attention_kwargs=kwargs,
                          return_dict=False)
        loss = sum((r * torch.linspace(-1, 1, r.numel(), dtype=r.dtype).view(r.shape)).sum() for r in (*down, mid))
        loss.backward()
        return torch.cat([r.flatten() for r in (*down, mid)]).detach(), [p.grad.clone() for p in fuser.parameters()]

    plain_out, plain_grads = run()
    assert calls == []
    fuser.enable_gradient_checkpointing()
    with torch.no_grad():
        fuser(sample, 5, context, fg, bg)
    assert calls == []
    ckpt_out, ckpt_grads = run()
    # level 0: 2 FDN/plain resnets + 2 transformers; level 1: 2 resnets
    assert calls == ["FDNResnetBlock2D", "Transformer2DModel", "ResnetBlock2D", "Transformer2DModel",
                     "FDNResnetBlock2D", "ResnetBlock2D"]
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=1e-12)
    assert plain_out.abs().max() > 1e-4
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_fdn_reports_both_sizes_of_a_mismatch() -> None:
    """Features of another size than the activations: the error names both (height, width)."""
    fdn = FDN(channels=8, feature_channels=6, groups=2)
    with pytest.raises(ValueError, match=r"^depth features \(4, 7\) do not match activations \(5, 7\)$"):
        fdn(torch.zeros(1, 8, 5, 7), torch.zeros(1, 6, 4, 7))


@pytest.mark.parametrize("kind", ["down", "up", "scale_shift"])
def test_fdn_refuses_resnet_blocks_it_cannot_reproduce(kind: str) -> None:
    """A resampling ResBlock or one with another time-embedding norm would lose that part silently."""
    options = {"down": dict(down=True), "up": dict(up=True), "scale_shift": dict(time_embedding_norm="scale_shift")}
    resnet = ResnetBlock2D(in_channels=IN, out_channels=OUT, temb_channels=TEMB, groups=2, **options[kind])
    message = r"^FDN supports plain ResnetBlock2D \(no up/down sampling, default time norm\)$"
    with pytest.raises(ValueError, match=message):
        FDNResnetBlock2D(resnet, FEAT)


def test_depth_encoder_is_the_official_layout_computed_by_hand() -> None:
    """Each stream is 3x3 convs ``3 -> 32 -> 64 -> 64 -> 64`` with strides 1, 2, 1, 2, each followed
    by SiLU; the streams' outputs are concatenated fg first; each level is a 3x3 stride-2 conv with
    SiLU, then a 3x3 zero conv. Parameter names and shapes are the ones converted checkpoints load
    into; the features equal the computation written out with ``F.conv2d``."""
    torch.manual_seed(0)
    enc = DepthEncoder(3, (32, 64)).double()
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items() if k.endswith("weight")}
    stream = {"0": (32, 3, 3, 3), "2": (64, 32, 3, 3), "4": (64, 64, 3, 3), "6": (64, 64, 3, 3)}
    assert shapes == {
        **{f"{s}_stream.{i}.weight": shape for s in ("fg", "bg") for i, shape in stream.items()},
        "extractors.0.0.weight": (32, 128, 3, 3), "extractors.1.0.weight": (64, 32, 3, 3),
        "zero_convs.0.weight": (32, 32, 3, 3), "zero_convs.1.weight": (64, 64, 3, 3),
    }
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for conv in enc.zero_convs:
            conv.weight.normal_(0, 0.1, generator=gen)
            conv.bias.normal_(0, 0.1, generator=gen)
    fg, bg = (torch.rand(2, 3, 64, 96, generator=gen, dtype=torch.float64) for _ in range(2))

    def conv(x: torch.Tensor, layer: torch.nn.Conv2d, stride: int) -> torch.Tensor:
        return F.conv2d(x, layer.weight, layer.bias, stride=stride, padding=1)

    def stream_by_hand(layers: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for index, stride in zip((0, 2, 4, 6), (1, 2, 1, 2)):
            x = F.silu(conv(x, layers[index], stride))
        return x

    with torch.no_grad():
        h = torch.cat([stream_by_hand(enc.fg_stream, fg), stream_by_hand(enc.bg_stream, bg)], dim=1)
        want = []
        for extractor, zero_conv in zip(enc.extractors, enc.zero_convs):
            h = F.silu(conv(h, extractor[0], 2))
            want.append(conv(h, zero_conv, 1))
        got = enc(fg, bg)
    assert [tuple(f.shape) for f in got] == [(2, 32, 8, 12), (2, 64, 4, 6)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_from_unet_keeps_the_unets_dtype_and_the_depth_channels_asked_for() -> None:
    """A half-precision UNet gives a half-precision fuser holding the UNet's weights exactly; a
    ``depth_channels=1`` fuser takes gray depth maps."""
    unet = tiny_sd_components(0)["unet"].half()
    fuser = LocalFuser.from_unet(unet, depth_channels=1)
    assert fuser.dtype == torch.float16 and fuser.config.depth_channels == 1
    assert fuser.depth_encoder.fg_stream[0].in_channels == fuser.depth_encoder.bg_stream[0].in_channels == 1
    assert torch.equal(fuser.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(fuser.down_blocks[1].resnets[0].conv2.weight, unet.down_blocks[1].resnets[0].conv2.weight)
