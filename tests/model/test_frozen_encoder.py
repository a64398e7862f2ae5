"""Training forward as the official code: frozen SD encoder + mid block without gradient (issue 14, item 5)."""

from __future__ import annotations

import pytest
import torch

from cnc_model.cnc.frozen_encoder import FrozenEncoderUNet
from cnc_model.cnc.training import CnCTrainingStep, DropoutConfig
from tests.model.test_training import fixed_batch, make_step


def randomize_zero_convs(step: CnCTrainingStep) -> None:
    """Non-zero residuals, so that the local fuser's output reaches the loss."""
    g = torch.Generator().manual_seed(9)
    fuser = step.local_fuser
    with torch.no_grad():
        for conv in [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block, *fuser.depth_encoder.zero_convs]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)


def grads_after_backward(stage: str, encoder_grad: bool) -> tuple[float, dict[str, torch.Tensor | None]]:
    step = make_step(stage, DropoutConfig(text=0.0, conditions=0.0))
    step.encoder_grad = encoder_grad
    randomize_zero_convs(step)
    step.unet.requires_grad_(True)  # a probe: which frozen weights would autograd reach?
    for m in (step.unet, step.local_fuser, step.global_fuser):
        m.eval()  # no module dropout: both runs see the same function
    torch.manual_seed(0)
    loss = step.loss(fixed_batch(), torch.Generator().manual_seed(5))
    loss.backward()
    named = {f"unet.{k}": p for k, p in step.unet.named_parameters()}
    named.update({f"local.{k}": p for k, p in step.local_fuser.named_parameters()})
    named.update({f"global.{k}": p for k, p in step.global_fuser.named_parameters()})
    return loss.item(), {k: (None if p.grad is None else p.grad.clone()) for k, p in named.items()}


def has_grad(grads: dict[str, torch.Tensor | None], prefix: str) -> list[bool]:
    return [g is not None and bool(g.abs().sum() > 0) for k, g in grads.items() if k.startswith(prefix)]


def test_frozen_encoder_unet_gives_the_unet_output():
    step = make_step("local")
    randomize_zero_convs(step)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    down, mid = step.local_fuser(x, t, ctx, torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g),
                                 return_dict=False)
    ref = step.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]
    out = FrozenEncoderUNet(step.unet)(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid, return_dict=False)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", ["local", "global", "full"])
def test_official_forward_gives_no_gradient_to_the_frozen_encoder(stage):
    loss_official, official = grads_after_backward(stage, encoder_grad=False)
    loss_ours, through = grads_after_backward(stage, encoder_grad=True)
    assert loss_official == pytest.approx(loss_ours, rel=1e-6)  # same function, other gradients
    for prefix in ("unet.down_blocks.", "unet.mid_block.", "unet.conv_in.", "unet.time_embedding."):
        assert not any(has_grad(official, prefix)), prefix
        assert any(has_grad(through, prefix)), prefix
    assert all(has_grad(official, "unet.conv_out.")) and any(has_grad(official, "unet.up_blocks."))
    trained = {"local": ["local."], "global": ["global."], "full": ["local.", "global."]}[stage]
    for prefix in trained:
        assert any(has_grad(official, prefix))
    if stage != "local":
        # exemplar tokens: only through the decoder's (and, in `full`, the fuser's) cross-attention
        fg = [k for k in official if k.startswith("global.fg_stream.")]
        assert any(not torch.allclose(official[k], through[k]) for k in fg)
    if stage == "global":
        assert not any(has_grad(official, "local."))
