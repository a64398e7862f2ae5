"""The guided processor is diffusers' ``AttnProcessor2_0`` given the soft-guidance bias as its
attention mask, for every feature an ``Attention`` layer may have: 4-D input, spatial norm,
group norm, context norm, q/k norms, a residual connection, an output rescale and a caller's own
attention mask. SD's cross-attention layers use none of these, so the role tests cannot see a
slip in them; this test does. Written to kill the mutants of ``soft_guidance.py`` that survived
``make mutants`` (docs/testing.md). float64, random weights (no norm is the identity), a batch
of 2 with different masks, a non-square latent."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from cnc_model.cnc.soft_guidance import SoftGuidance, SoftGuidanceAttnProcessor

H, W, TEXT, CHANNELS, CONTEXT_DIM = 3, 5, 6, 32, 12


def _randomised(attn: Attention, seed: int) -> Attention:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return attn.double().eval()


def _masks() -> torch.Tensor:
    mask = torch.zeros(2, 1, H, W)
    mask[0, :, :, :2] = 1  # image 0: left columns
    mask[1, :, 1:, 3:] = 1  # image 1: bottom right
    return mask


def _reference(attn: Attention, x: torch.Tensor, context: torch.Tensor, guidance: SoftGuidance,
               temb: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    bias = guidance.bias(H * W, context.shape[1], x.dtype, x.device)[:, 0]  # (B, Q, K)
    if attention_mask is not None:
        bias = bias + attention_mask  # (B, 1, K) broadcast over the queries
    return AttnProcessor2_0()(attn, x, context, attention_mask=bias, temb=temb)


@pytest.mark.parametrize("with_caller_mask", [False, True])
def test_every_attention_feature_matches_attn_processor_2_0_with_the_bias(with_caller_mask: bool) -> None:
    attn = _randomised(Attention(query_dim=CHANNELS, cross_attention_dim=CONTEXT_DIM, heads=2, dim_head=4,
                                 bias=True, norm_num_groups=4, spatial_norm_dim=3,
                                 cross_attention_norm="layer_norm", qk_norm="layer_norm",
                                 residual_connection=True, rescale_output_factor=2.0), seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, CHANNELS, H, W, generator=gen, dtype=torch.float64)  # 4-D, as in a VAE block
    context = torch.randn(2, TEXT + 8, CONTEXT_DIM, generator=gen, dtype=torch.float64)
    temb = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)  # the spatial norm's zq
    caller = None
    if with_caller_mask:
        caller = torch.zeros(2, 1, TEXT + 8, dtype=torch.float64)
        caller[0, 0, 1] = caller[1, 0, 3] = -1e4  # each image hides another text token
    guidance = SoftGuidance(_masks(), (H, W))
    with torch.no_grad():
        out = SoftGuidanceAttnProcessor()(attn, x, context, attention_mask=caller, temb=temb, soft_guidance=guidance)
        want = _reference(attn, x, context, guidance, temb, caller)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_without_guidance_every_argument_reaches_attn_processor_2_0() -> None:
    """The unguided path (no ``soft_guidance``, or self-attention) passes the caller's attention
    mask and ``temb`` on: the processor is then ``AttnProcessor2_0`` bit for bit."""
    attn = _randomised(Attention(query_dim=CHANNELS, cross_attention_dim=CONTEXT_DIM, heads=2, dim_head=4,
                                 norm_num_groups=4, spatial_norm_dim=3, residual_connection=True), seed=5)
    self_attn = _randomised(Attention(query_dim=CHANNELS, heads=2, dim_head=4, spatial_norm_dim=3), seed=6)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, CHANNELS, H, W, generator=gen, dtype=torch.float64)
    context = torch.randn(2, TEXT + 8, CONTEXT_DIM, generator=gen, dtype=torch.float64)
    temb = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    cross_mask = torch.zeros(2, 1, TEXT + 8, dtype=torch.float64)
    cross_mask[:, :, :3] = -1e4
    self_mask = torch.zeros(2, 1, H * W, dtype=torch.float64)
    self_mask[:, :, 5:] = -1e4
    guidance = SoftGuidance(_masks(), (H, W))
    with torch.no_grad():
        for layer, ctx, mask, kwargs in ((attn, context, cross_mask, {}),
                                         (self_attn, None, self_mask, {"soft_guidance": guidance})):
            got = SoftGuidanceAttnProcessor()(layer, x, ctx, attention_mask=mask, temb=temb, **kwargs)
            want = AttnProcessor2_0()(layer, x, ctx, attention_mask=mask, temb=temb)
            assert torch.equal(got, want)
            assert (got - AttnProcessor2_0()(layer, x, ctx, temb=temb)).abs().max() > 1e-3  # the mask acts


def test_sd_style_layer_with_a_3d_sequence_matches_too() -> None:
    """The layout SD's transformer blocks use: (B, h*w, C) queries, no norms, no residual."""
    attn = _randomised(Attention(query_dim=CHANNELS, cross_attention_dim=CONTEXT_DIM, heads=4, dim_head=4), seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, H * W, CHANNELS, generator=gen, dtype=torch.float64)
    context = torch.randn(2, TEXT + 8, CONTEXT_DIM, generator=gen, dtype=torch.float64)
    guidance = SoftGuidance(_masks(), (H, W))
    with torch.no_grad():
        out = SoftGuidanceAttnProcessor()(attn, x, context, soft_guidance=guidance)
        want = _reference(attn, x, context, guidance)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    # and the bias does act: without it the output differs
    assert (out - AttnProcessor2_0()(attn, x, context)).abs().max() > 1e-3
