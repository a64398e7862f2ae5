"""``lambda_fg``, ``lambda_bg``, ``depth_scale`` and ``mask_threshold`` each reach what they scale,
with values that tell them apart (a swapped or ignored argument fails)."""

from __future__ import annotations

import torch

from cnc_model.cnc.conditioning import mask_from_depth
from tests.model.conftest import random_depth
from tests.model.recorders import record_calls

HEIGHT, WIDTH = 64, 96


def _embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(31)
    return torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., 0:32, 0:48] = 1
    return mask


def _unet_calls(pipe, **kwargs) -> list[dict]:
    fg_e, bg_e = _embeds()
    conditions = dict(fg_depth=random_depth(HEIGHT, WIDTH, 1), bg_depth=random_depth(HEIGHT, WIDTH, 2),
                      fg_image_embeds=fg_e, bg_image_embeds=bg_e)
    conditions.update(kwargs)
    conditions.setdefault("mask", _mask())
    with record_calls(pipe.unet) as calls:
        pipe("a red cube on a table", negative_prompt="blurry", num_inference_steps=1, guidance_scale=7.0,
             height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(0), output_type="latent", **conditions)
    return calls


def test_lambda_fg_and_lambda_bg_scale_their_own_tokens(trained_like_pipe) -> None:
    fg_e, bg_e = _embeds()
    with torch.no_grad():
        fg_tokens, bg_tokens = trained_like_pipe.global_fuser(fg_e, bg_e)
    context = _unet_calls(trained_like_pipe, lambda_fg=0.5, lambda_bg=3.0)[0]["kwargs"]["encoder_hidden_states"]
    for row in context:  # uncond and text rows alike
        torch.testing.assert_close(row[77:81], 0.5 * fg_tokens[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(row[81:85], 3.0 * bg_tokens[0], atol=1e-6, rtol=1e-6)


def test_depth_scale_multiplies_the_local_fuser_residuals(trained_like_pipe) -> None:
    def residuals(scale: float) -> list[torch.Tensor]:
        kwargs = _unet_calls(trained_like_pipe, depth_scale=scale)[0]["kwargs"]
        return [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]]

    full, scaled = residuals(1.0), residuals(0.25)
    assert all(r.abs().max() > 0 for r in full)
    for a, b in zip(full, scaled):
        torch.testing.assert_close(b, 0.25 * a, atol=1e-6, rtol=1e-5)


def _stepped_fg_depth() -> torch.Tensor:
    """fg depth: 1.0 in the top-left block, 0.5 in the bottom-right one, 0 elsewhere."""
    depth = torch.zeros(1, 3, HEIGHT, WIDTH)
    depth[..., 0:24, 0:32] = 1.0
    depth[..., 40:64, 56:96] = 0.5
    return depth


def _expected_mask(threshold: float) -> torch.Tensor:
    """By hand: the 1.0 block always; the 0.5 block only below half the peak."""
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., 0:24, 0:32] = 1
    if threshold < 0.5:
        mask[..., 40:64, 56:96] = 1
    return mask


def test_mask_from_depth_thresholds_relative_to_the_peak() -> None:
    depth = _stepped_fg_depth()
    for threshold in (0.75, 0.25):
        assert torch.equal(mask_from_depth(depth, threshold), _expected_mask(threshold))
        # relative to the peak, not absolute
        assert torch.equal(mask_from_depth(depth * 0.4, threshold), _expected_mask(threshold))


def test_pipeline_passes_mask_threshold_to_the_derived_mask(trained_like_pipe) -> None:
    """Pins today's rule for a missing mask (derived from fg depth; issue 14 may change it)."""
    depth = _stepped_fg_depth()
    for threshold in (0.75, 0.25):
        calls = _unet_calls(trained_like_pipe, fg_depth=depth, mask=None, mask_threshold=threshold)
        guidance = calls[0]["kwargs"]["cross_attention_kwargs"]["soft_guidance"]
        assert torch.equal(guidance.mask, _expected_mask(threshold))
