"""CnCPipeline: equivalences with plain SD, soft-guidance exactness, sizes, save/load, schedulers."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from cnc_model.cnc.pipeline_cnc import CnCPipeline
from cnc_model.cnc.soft_guidance import SoftGuidanceAttnProcessor
from tests.model.conftest import make_cnc_pipeline, make_sd_pipeline, random_depth, random_image

STEPS = 3


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 7.0)
    return pipe("a red cube on a table", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_defaults_are_ddim_50_steps_guidance_7(cnc_pipe):
    params = inspect.signature(CnCPipeline.__call__).parameters
    assert params["num_inference_steps"].default == 50
    assert params["guidance_scale"].default == 7.0
    assert isinstance(cnc_pipe.scheduler, DDIMScheduler)


def test_untrained_cnc_with_depth_equals_plain_sd(sd_pipe, cnc_pipe):
    # independent UNets: the reference runs diffusers' own processor, CnC its soft-guidance one
    assert all(type(p) is AttnProcessor2_0 for p in sd_pipe.unet.attn_processors.values())
    assert all(type(p) is SoftGuidanceAttnProcessor for p in cnc_pipe.unet.attn_processors.values())
    reference = run(sd_pipe)
    out = run(cnc_pipe, fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2), missing_conditions="skip")
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=0)


def test_no_conditions_is_plain_sd_even_with_trained_fusers(sd_pipe, trained_like_pipe):
    """With missing_conditions="skip" (not the official default: see test_official_parity)."""
    reference = run(sd_pipe)
    np.testing.assert_allclose(run(trained_like_pipe, missing_conditions="skip"), reference, atol=1e-5, rtol=0)
    # and the depth branch of that pipeline is not a no-op, so the equality above is meaningful
    with_depth = run(trained_like_pipe, fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2),
                     missing_conditions="skip")
    assert np.abs(with_depth - reference).max() > 1e-3


@pytest.mark.parametrize("mask_value, unused", [(0.0, "fg"), (1.0, "bg")])
def test_exemplar_outside_its_mask_region_has_no_effect(trained_like_pipe, mask_value, unused):
    mask = torch.full((1, 1, 64, 64), mask_value)
    depth = dict(fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2))
    a, b = random_image((48, 40), 1), random_image((48, 40), 2)
    base = run(trained_like_pipe, fg_exemplar=a, bg_exemplar=a, mask=mask, **depth)
    swap_unused = {f"{unused}_exemplar": b, f"{'bg' if unused == 'fg' else 'fg'}_exemplar": a}
    swap_used = {f"{unused}_exemplar": a, f"{'bg' if unused == 'fg' else 'fg'}_exemplar": b}
    assert np.array_equal(run(trained_like_pipe, mask=mask, **swap_unused, **depth), base)
    assert np.abs(run(trained_like_pipe, mask=mask, **swap_used, **depth) - base).max() > 1e-4


def test_exemplar_embeddings_equal_exemplar_images(trained_like_pipe):
    a, b = random_image((40, 40), 3), random_image((40, 40), 4)
    fg_e = trained_like_pipe.encode_exemplar(a, torch.device("cpu"))
    bg_e = trained_like_pipe.encode_exemplar(b, torch.device("cpu"))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    from_images = run(trained_like_pipe, fg_exemplar=a, bg_exemplar=b, mask=mask)
    from_embeds = run(trained_like_pipe, fg_image_embeds=fg_e, bg_image_embeds=bg_e, mask=mask)
    assert np.array_equal(from_images, from_embeds)


def test_mask_is_derived_from_fg_depth_when_asked(trained_like_pipe):
    fg_depth = torch.zeros(1, 3, 64, 64)
    fg_depth[..., 8:40, 16:56] = 0.8
    derived = (fg_depth[:, :1] > 0).float()
    kwargs = dict(fg_depth=fg_depth, fg_exemplar=random_image((32, 32), 5), bg_exemplar=random_image((32, 32), 6),
                  mask_source="fg_depth")
    assert np.array_equal(run(trained_like_pipe, **kwargs), run(trained_like_pipe, mask=derived, **kwargs))


@pytest.mark.slow
def test_non_square_and_768px(trained_like_pipe):
    out = run(trained_like_pipe, fg_depth=random_depth(64, 96, 1), bg_depth=random_depth(64, 96, 2),
              fg_exemplar=random_image((20, 30), 1), bg_exemplar=random_image((30, 20), 2), num_inference_steps=2)  # fmt: skip
    assert out.shape == (1, 64, 96, 3)
    mask = torch.zeros(1, 1, 768, 768)
    mask[..., :, :300] = 1
    big = run(trained_like_pipe, fg_depth=random_depth(768, 768, 3), bg_depth=random_depth(768, 768, 4), mask=mask,
              fg_exemplar=random_image((64, 64), 1), bg_exemplar=random_image((64, 64), 2), num_inference_steps=1)  # fmt: skip
    assert big.shape == (1, 768, 768, 3)
    assert np.isfinite(big).all()


def test_depth_of_other_size_is_resized_and_sets_default_size(trained_like_pipe):
    out = run(trained_like_pipe, fg_depth=random_depth(72, 100, 1), num_inference_steps=1)
    assert out.shape == (1, 72, 96, 3)  # rounded down to multiples of 8


def test_batched_prompts_with_per_prompt_conditions_equal_separate_runs(trained_like_pipe):
    prompts = ["a red cube", "a green cone"]
    depth = torch.cat([random_depth(64, 64, 1), random_depth(64, 64, 2)])
    embeds = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :32] = 1
    mask[1, :, :, 32:] = 1
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(num_inference_steps=2, guidance_scale=7.0, output_type="np")
    together = trained_like_pipe(prompts, fg_depth=depth, fg_image_embeds=embeds, bg_image_embeds=embeds.flip(0), mask=mask,
                                 num_images_per_prompt=2, latents=latents, **common).images  # fmt: skip
    for p in range(2):
        for i in range(2):
            alone = trained_like_pipe(prompts[p], fg_depth=depth[p : p + 1], fg_image_embeds=embeds[p : p + 1],
                                      bg_image_embeds=embeds.flip(0)[p : p + 1], mask=mask[p : p + 1],
                                      latents=latents[2 * p + i : 2 * p + i + 1], **common).images  # fmt: skip
            np.testing.assert_allclose(together[2 * p + i], alone[0], atol=1e-5, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path, trained_like_pipe):
    kwargs = dict(fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2), fg_exemplar=random_image((40, 40), 1),
                  bg_exemplar=random_image((40, 40), 2), mask=torch.ones(1, 1, 32, 32))  # fmt: skip
    before = run(trained_like_pipe, **kwargs)
    trained_like_pipe.save_pretrained(tmp_path)
    assert list(tmp_path.glob("local_fuser/*.safetensors")) and list(tmp_path.glob("unet/*.safetensors"))
    assert not list(tmp_path.rglob("*.bin"))
    loaded = CnCPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(loaded, **kwargs), before)
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(generic).__name__ == "CnCPipeline"
    generic.set_progress_bar_config(disable=True)
    assert np.array_equal(run(generic, **kwargs), before)


def test_foreign_module_file_is_never_imported(tmp_path, cnc_pipe):
    cnc_pipe.save_pretrained(tmp_path)
    (tmp_path / "pipeline_cnc.py").write_text("raise SystemExit('not ours')\n")
    assert isinstance(CnCPipeline.from_pretrained(tmp_path), CnCPipeline)  # more in test_model_folder_safety.py


def test_any_scheduler_swaps_in():
    sd, cnc = make_sd_pipeline(), make_cnc_pipeline()
    for pipe in (sd, cnc):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = run(sd)
    np.testing.assert_allclose(run(cnc, fg_depth=random_depth(64, 64, 1), missing_conditions="skip"), reference,
                               atol=1e-5, rtol=0)
    assert np.abs(reference - run(make_sd_pipeline())).max() > 1e-4  # Euler really differs from DDIM


def test_bad_inputs_fail_clearly(cnc_pipe):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(cnc_pipe, fg_depth=torch.full((1, 3, 64, 64), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        run(cnc_pipe, fg_depth=torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="multiples of 8"):
        run(cnc_pipe, height=60, width=64)
    with pytest.raises(ValueError, match="one per prompt"):
        run(cnc_pipe, fg_depth=torch.rand(3, 3, 64, 64), num_images_per_prompt=2)
    sd_only = make_cnc_pipeline()
    sd_only.local_fuser = None
    with pytest.raises(ValueError, match="local_fuser"):
        run(sd_only, fg_depth=random_depth(64, 64, 1))


def tiny_depth_estimator():
    from transformers import DPTConfig, DPTForDepthEstimation

    try:
        from transformers import DPTImageProcessorPil as DPTProcessor
    except ImportError:  # transformers 4.x
        from transformers import DPTImageProcessor as DPTProcessor
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8, neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])  # fmt: skip
    return DPTForDepthEstimation(config).eval(), DPTProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)


def test_depth_estimated_from_images_equals_given_depth():
    pipe = make_cnc_pipeline(randomize_zero_convs=True)
    estimator, processor = tiny_depth_estimator()
    pipe.register_modules(depth_estimator=estimator, depth_processor=processor)
    image = random_image((56, 48), 9)
    depth = pipe.estimate_depth(image, 64, 64, torch.device("cpu"))
    assert depth.shape == (1, 3, 64, 64) and depth.min() >= 0 and depth.max() <= 1 and depth.std() > 0
    raw = dict(fg_depth_mode="image", missing_conditions="skip")
    assert np.array_equal(run(pipe, fg_depth_image=image, height=64, width=64, **raw), run(pipe, fg_depth=depth, **raw))
    assert np.abs(run(pipe, fg_depth=depth, **raw) - run(pipe, **raw)).max() > 1e-4
