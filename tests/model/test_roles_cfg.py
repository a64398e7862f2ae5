"""Classifier-free guidance keeps every CnC condition in its unconditional branch, as the official
code does (its unconditional call gets the same depth maps, exemplar tokens and mask, only the
text is the negative prompt). Every condition is passed explicitly."""

from __future__ import annotations

import dataclasses

import torch

from cnc_model.cnc.conditioning import CnCConditions, cnc_noise_prediction
from tests.model.conftest import random_depth
from tests.model.recorders import record_calls, record_scheduler_inputs

HEIGHT, WIDTH, SCALE = 64, 96, 7.0
PROMPT, NEGATIVE = "a red cube on a table", "blurry"


def _inputs() -> dict:
    g = torch.Generator().manual_seed(21)
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., 8:40, 0:40] = 1
    return dict(fg_depth=random_depth(HEIGHT, WIDTH, 1), bg_depth=random_depth(HEIGHT, WIDTH, 2), mask=mask,
                fg_image_embeds=torch.randn(1, 32, generator=g), bg_image_embeds=torch.randn(1, 32, generator=g))


def test_unconditional_branch_keeps_depth_exemplars_and_mask(trained_like_pipe) -> None:
    pipe, cpu = trained_like_pipe, torch.device("cpu")
    latents = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(4))
    inputs = _inputs()
    with record_scheduler_inputs(pipe) as eps_hats, record_calls(pipe.unet) as calls:
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, guidance_scale=SCALE, height=HEIGHT,
             width=WIDTH, latents=latents, output_type="latent", **inputs)
    # one batched call [uncond, text], both rows with the exemplar tokens
    context = calls[0]["kwargs"]["encoder_hidden_states"]
    assert context.shape[:2] == (2, 77 + 8)
    assert torch.equal(context[0, 77:], context[1, 77:])

    # the same step by hand, each branch alone with the full conditions
    conditions = pipe.prepare_conditions(HEIGHT, WIDTH, cpu, torch.float32, **inputs)
    text = pipe.encode_text(PROMPT, cpu)
    uncond = pipe.encode_text(NEGATIVE, cpu)
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    x = pipe.scheduler.scale_model_input(latents * pipe.scheduler.init_noise_sigma, t)

    def eps_hat(uncond_conditions: CnCConditions) -> torch.Tensor:
        with torch.no_grad():
            eps_u = cnc_noise_prediction(pipe.unet, pipe.local_fuser, x, t, uncond, uncond_conditions)
            eps_t = cnc_noise_prediction(pipe.unet, pipe.local_fuser, x, t, text, conditions)
        return eps_u + SCALE * (eps_t - eps_u)

    expected = eps_hat(conditions)
    torch.testing.assert_close(eps_hats[0], expected, atol=1e-5, rtol=1e-5)
    # and dropping any one condition from the unconditional branch is visible far beyond that tolerance
    for dropped in ({"fg_depth": None, "bg_depth": None}, {"fg_tokens": None, "bg_tokens": None}, {"mask": None}):
        assert (eps_hat(dataclasses.replace(conditions, **dropped)) - expected).abs().max() > 1e-3, dropped
