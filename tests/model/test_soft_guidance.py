"""Soft-guidance attention: exact masking semantics, one bias per resolution, no per-head copies."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from cnc_model.cnc.soft_guidance import SoftGuidance, SoftGuidanceAttnProcessor, attention_resolutions, install_soft_guidance
from cnc_model.tiny import tiny_sd_components


def naive_masked_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The reference formulation: logits, masked_fill(most negative), softmax, per head."""
    b, n, _ = x.shape
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * d**-0.5
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


def test_processor_matches_naive_masked_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4)
    h, w, text = 4, 6, 5
    x, context = torch.randn(2, h * w, 16), torch.randn(2, text + 8, 12)
    mask = (torch.rand(2, 1, h, w) > 0.5).float()
    guidance = SoftGuidance(mask, (h, w))
    out = SoftGuidanceAttnProcessor()(attn, x, context, soft_guidance=guidance)
    fg = mask.flatten(1).bool()
    allowed = torch.ones(2, h * w, text + 8, dtype=torch.bool)
    allowed[:, :, text : text + 4] = fg[:, :, None]
    allowed[:, :, text + 4 :] = ~fg[:, :, None]
    torch.testing.assert_close(out, naive_masked_attention(attn, x, context, allowed), atol=1e-6, rtol=1e-5)


def test_without_soft_guidance_it_is_attn_processor_2_0_bit_for_bit():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    x, context = torch.randn(2, 20, 16), torch.randn(2, 7, 12)
    assert torch.equal(SoftGuidanceAttnProcessor()(attn, x, context), AttnProcessor2_0()(attn, x, context))
    self_attn = Attention(query_dim=16, heads=2, dim_head=8)
    guidance = SoftGuidance(torch.ones(1, 1, 4, 5), (4, 5))  # ignored by self-attention
    assert torch.equal(SoftGuidanceAttnProcessor()(self_attn, x, soft_guidance=guidance), AttnProcessor2_0()(self_attn, x))


def test_official_mask_resize_keeps_a_one_pixel_line_down_to_8x8():
    """The reference resizes bicubically without antialias and counts any non-zero value: a
    1-pixel-wide object at 64x64 latents survives to the 8x8 level (area + 0.5 loses it)."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 4] = 1  # a vertical line in the left column block, on a bicubic tap
    official = SoftGuidance(mask, (64, 64)).resized_mask((8, 8)).view(8, 8)
    assert official[:, 0].all() and not official[:, 2:].any()  # its own column (edge ringing may add the next)
    assert not SoftGuidance(mask, (64, 64), mask_resize="area").resized_mask((8, 8)).any()
    right = torch.flip(mask, dims=[-1])  # the same line on the right edge lands in the last column
    flipped = SoftGuidance(right, (64, 64)).resized_mask((8, 8)).view(8, 8)
    assert flipped[:, 7].all() and not flipped[:, :6].any()
    expected = torch.nn.functional.interpolate(mask, size=(16, 16), mode="bicubic", antialias=False) != 0
    assert torch.equal(SoftGuidance(mask, (64, 64)).resized_mask((16, 16)), expected.flatten(1))


def test_bias_values_shape_and_resizing_for_non_square_latents():
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., :, :48] = 1  # left half is foreground
    guidance = SoftGuidance(mask, (8, 12), mask_resize="area")
    bias = guidance.bias(4 * 6, 77 + 8, torch.float32, torch.device("cpu"))
    assert bias.shape == (1, 1, 24, 85)  # broadcast over heads: no per-head copy
    grid = bias[0, 0].view(4, 6, 85)
    neg = torch.finfo(torch.float32).min
    assert (grid[..., :77] == 0).all()
    assert (grid[:, :3, 77:81] == 0).all() and (grid[:, 3:, 77:81] == neg).all()
    assert (grid[:, :3, 81:] == neg).all() and (grid[:, 3:, 81:] == 0).all()


def test_resolutions_halve_with_ceil():
    assert attention_resolutions((9, 12), 4) == [(9, 12), (5, 6), (3, 3), (2, 2)]


def test_one_bias_per_resolution_shared_by_all_layers():
    unet = tiny_sd_components()["unet"]
    install_soft_guidance(unet)
    calls = []
    original = SoftGuidance.bias

    def counting_bias(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    guidance = SoftGuidance(torch.ones(1, 1, 8, 8), (8, 8))
    SoftGuidance.bias = counting_bias
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 85, 32), cross_attention_kwargs={"soft_guidance": guidance})
    finally:
        SoftGuidance.bias = original
    cross_layers = sum(1 for name in unet.attn_processors if "attn2" in name)
    assert len(calls) == cross_layers > 2  # every cross-attention layer asked...
    assert guidance.num_builds == len(set(calls)) == 2  # ...but each resolution was built once (8x8 down/up, 4x4 mid)
