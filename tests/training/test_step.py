"""The optimisation step's options keep the loss: gradient checkpointing recomputes, it does not change."""

from __future__ import annotations

import torch

from tasks.training.config import stage_config
from tasks.training.models import start_pipeline
from tasks.training.step import build_step
from tests.model.test_training import fixed_batch


def loss_and_grads(checkpointing: bool) -> tuple[float, list[torch.Tensor], int]:
    cfg = stage_config("full", gradient_checkpointing=checkpointing, text_dropout=0.0, condition_dropout=0.0)
    step = build_step(cfg, start_pipeline(cfg), torch.device("cpu"))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # non-zero residuals, so that the local fuser's blocks reach the loss
        for conv in [*step.local_fuser.controlnet_down_blocks, step.local_fuser.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    for m in step.trainable_modules():
        m.eval()  # no module dropout
    calls = []
    resnet = step.local_fuser.down_blocks[0].resnets[0]
    forward = resnet.forward
    resnet.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]  # hooks do not see recomputes
    loss = step.loss(fixed_batch(), torch.Generator().manual_seed(5))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in step.trainable_parameters() if p.grad is not None], len(calls)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain_loss, plain, plain_calls = loss_and_grads(False)
    ckpt_loss, ckpt, ckpt_calls = loss_and_grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # recomputed in backward: checkpointing is on
    assert plain_loss == ckpt_loss
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
