"""Roles in GLoD: through the pipelines (GLoDPipeline and CnCPipeline's ``glod=``), each prompt's
row of the batched UNet call holds that prompt's text, and the ε̂ given to the scheduler is the
hand-composed ``ε_u + w_g (ε_g − ε_u) + Σ w_l M_l ⊙ (ε_l − ε_u)`` with each local prompt's own
weight and own region (built here by hand, not by the code under test)."""

from __future__ import annotations

import torch

from cnc_model.glod.pipeline_glod import GLoDPipeline
from cnc_model.tiny import tiny_sd_components
from tests.model.conftest import random_depth
from tests.model.recorders import record_calls, record_scheduler_inputs

GLOBAL = "a man is talking with a woman"
MAN = {"text": "a man with white beard", "object": "man", "box": [0, 8, 32, 64], "weight": 5.0}
WOMAN = {"text": "a woman with red hair", "object": "woman", "box": [40, 0, 64, 40], "weight": 2.0}
SPEC = {"width": 64, "height": 64, "negative_prompt": "blurry", "feather": 0, "local_steps": [0.0, 1.0],
        "global_prompts": [{"text": GLOBAL, "weight": 7.5}], "local_prompts": [MAN, WOMAN],
        "layout_guidance": {"strength": 0.0}}


def _regions() -> tuple[torch.Tensor, torch.Tensor]:
    """MAN and WOMAN boxes on the 8 x 8 latent grid (8 px per cell), by hand."""
    man, woman = torch.zeros(8, 8), torch.zeros(8, 8)
    man[1:8, 0:4] = 1  # x 0..32, y 8..64
    woman[0:5, 5:8] = 1  # x 40..64, y 0..40
    return man, woman


def _check(pipe, calls: list, eps_hats: list) -> None:
    assert len(calls) == 1 and len(eps_hats) == 1
    context = calls[0]["kwargs"]["encoder_hidden_states"]
    texts = [SPEC["negative_prompt"], GLOBAL, MAN["text"], WOMAN["text"]]
    want = pipe.encode_text(texts, torch.device("cpu"))
    assert context.shape[0] == 4
    torch.testing.assert_close(context[:, :77], want, atol=1e-6, rtol=0)  # row k holds prompt k

    eps_u, eps_g, eps_man, eps_woman = calls[0]["output"][0].chunk(4)
    man, woman = _regions()
    expected = (eps_u + 7.5 * (eps_g - eps_u) + 5.0 * man * (eps_man - eps_u)
                + 2.0 * woman * (eps_woman - eps_u))
    torch.testing.assert_close(eps_hats[0], expected, atol=1e-6, rtol=1e-6)
    # the test can tell the weights apart: swapping them moves ε̂ well beyond the tolerance
    swapped = (eps_u + 7.5 * (eps_g - eps_u) + 2.0 * man * (eps_man - eps_u)
               + 5.0 * woman * (eps_woman - eps_u))
    assert (swapped - expected).abs().max() > 1e-3


def test_glod_pipeline_gives_each_local_prompt_its_own_weight_and_region() -> None:
    pipe = GLoDPipeline(**tiny_sd_components(0))
    pipe.set_progress_bar_config(disable=True)
    with record_calls(pipe.unet) as calls, record_scheduler_inputs(pipe) as eps_hats:
        pipe(SPEC, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent")
    _check(pipe, calls, eps_hats)


def test_cnc_pipeline_glod_gives_each_local_prompt_its_own_weight_and_region(trained_like_pipe) -> None:
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 0:24] = 1
    with record_calls(trained_like_pipe.unet) as calls, record_scheduler_inputs(trained_like_pipe) as eps_hats:
        trained_like_pipe(
            glod=SPEC, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent",
            fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2), mask=mask,
            fg_image_embeds=torch.randn(1, 32, generator=g), bg_image_embeds=torch.randn(1, 32, generator=g),
        )
    _check(trained_like_pipe, calls, eps_hats)
