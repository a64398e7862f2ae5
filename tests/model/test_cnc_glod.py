"""CnCPipeline with GLoD prompt layers (``glod=``): composition plugged into CnC's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.model.conftest import random_depth, random_image


def spec(**extra):
    base = {"width": 64, "height": 64, "negative_prompt": "", "global_prompts": [{"text": "a man and a dog", "weight": 7.0}]}
    return base | extra


def run(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np", **kwargs).images


def test_one_global_prompt_is_classifier_free_guidance(trained_like_pipe):
    depth = dict(fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2))
    with_glod = run(trained_like_pipe, glod=spec(), **depth)
    with_prompt = run(trained_like_pipe, prompt="a man and a dog", guidance_scale=7.0, **depth)
    assert np.array_equal(with_glod, with_prompt)


def test_local_prompts_compose_and_soft_guidance_still_holds(trained_like_pipe):
    layered = spec(local_prompts=[{"text": "a man with a white beard", "object": "man", "box": [0, 0, 32, 64], "weight": 5.0}])
    zero = torch.zeros(1, 1, 64, 64)
    common = dict(fg_depth=random_depth(64, 64, 1), mask=zero, bg_exemplar=random_image((32, 32), 1))
    a = run(trained_like_pipe, glod=layered, fg_exemplar=random_image((32, 32), 2), **common)
    b = run(trained_like_pipe, glod=layered, fg_exemplar=random_image((32, 32), 3), **common)
    assert np.array_equal(a, b)  # all-zero mask: the fg exemplar is ignored in every prompt layer
    assert np.abs(a - run(trained_like_pipe, glod=spec(), fg_exemplar=random_image((32, 32), 2), **common)).max() > 1e-4
    with pytest.raises(ValueError, match="not both"):
        run(trained_like_pipe, prompt="x", glod=layered)


def test_layout_guidance_in_the_spec_is_skipped_with_a_warning(trained_like_pipe, caplog):
    """CnC's loop has no layout guidance: skipped, with a warning only when the spec sets it itself
    (it is on by default in every spec with local prompts)."""
    depth = dict(fg_depth=random_depth(64, 64, 1))
    local = {"local_prompts": [{"text": "a brown dog", "object": "dog", "box": [0, 0, 32, 64], "weight": 4.0}]}
    with caplog.at_level("WARNING"):
        plain = run(trained_like_pipe, glod=spec(**local), **depth)
    assert "without layout guidance" not in caplog.text
    with caplog.at_level("WARNING"):
        guided = run(trained_like_pipe, glod=spec(layout_guidance={"strength": 30.0, "steps": 2}, **local), **depth)
    assert np.array_equal(guided, plain)
    assert "without layout guidance" in caplog.text


def test_depth_maps_set_the_size_over_the_specs(trained_like_pipe):
    # the spec's frame is 64x64; the depth maps are 32x48: the output follows the depth maps
    out = run(trained_like_pipe, glod=spec(), fg_depth=random_depth(32, 48, 1), bg_depth=random_depth(32, 48, 2))
    assert out.shape == (1, 32, 48, 3)
    assert run(trained_like_pipe, glod=spec(width=48, height=32)).shape == (1, 32, 48, 3)
