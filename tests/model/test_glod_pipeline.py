"""GLoDPipeline on tiny SD weights: equivalences with plain SD, the step loop, layout guidance, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from cnc_model.glod.layout_guidance import (
    AttentionStore,
    StoreCrossAttnProcessor,
    attention_store,
    layout_guidance_step,
    layout_loss,
)
from cnc_model.glod.prepare import layout_objects
from cnc_model.glod.spec import parse_spec
from cnc_model.glod.pipeline_glod import GLoDPipeline
from cnc_model.tiny import tiny_sd_components

STEPS = 4
GLOBAL = "a man is talking with a woman"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spec(locals_=(), **changes) -> dict:
    data = {"width": 64, "height": 64, "global_prompts": [{"text": GLOBAL, "weight": 7.5}], "local_prompts": list(locals_)}
    data.update(changes)
    return data


MAN = {"text": "a man with white beard", "object": "man", "box": [0, 8, 32, 64], "weight": 5.0}
WOMAN = {"text": "a woman with red hair", "object": "woman", "box": [32, 8, 64, 64], "weight": 4.0}


@pytest.fixture(scope="module")
def glod() -> GLoDPipeline:
    pipe = GLoDPipeline(**tiny_sd_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe: GLoDPipeline, spec=None, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(spec, generator=_gen(), output_type="np", **kwargs).images


def test_one_global_prompt_equals_stable_diffusion(glod: GLoDPipeline) -> None:
    sd = StableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    want = sd(GLOBAL, num_inference_steps=STEPS, guidance_scale=7.5, generator=_gen(), output_type="np",
              num_images_per_prompt=2).images
    by_prompt = _run(glod, prompt=GLOBAL, guidance_scale=7.5, num_images_per_prompt=2)
    by_spec = _run(glod, _spec(), num_images_per_prompt=2)
    np.testing.assert_allclose(by_prompt, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_spec, want, rtol=0, atol=1e-5)
    neg = sd(GLOBAL, negative_prompt="blurry", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(_run(glod, _spec(negative_prompt="blurry")), neg, rtol=0, atol=1e-5)
    assert np.abs(neg - want[:1]).max() > 1e-3


def test_local_prompt_with_empty_region_changes_nothing(glod: GLoDPipeline, tmp_path: Path) -> None:
    PIL.Image.new("L", (64, 64), 0).save(tmp_path / "empty.png")
    empty = {"text": "a man with white beard", "object": "man", "mask": str(tmp_path / "empty.png"), "weight": 5.0}
    np.testing.assert_allclose(_run(glod, _spec([empty])), _run(glod, _spec()), rtol=0, atol=1e-5)


def test_local_equal_to_global_with_full_region_raises_the_global_weight(glod: GLoDPipeline) -> None:
    spec = _spec([{"text": GLOBAL, "object": "man", "box": [0, 0, 64, 64], "weight": 2.5}],
                 global_prompts=[{"text": GLOBAL, "weight": 5.0}])
    np.testing.assert_allclose(_run(glod, spec), _run(glod, _spec()), rtol=0, atol=1e-5)


def test_locals_change_the_image(glod: GLoDPipeline) -> None:
    assert np.abs(_run(glod, _spec([MAN, WOMAN])) - _run(glod, _spec())).max() > 1e-3


class _UNetSpy:
    """Records, for every UNet forward: batch size, grad mode, whether a store processor is installed."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[tuple[int, bool, bool]] = []
        self.unet = unet
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        stored = any(isinstance(p, StoreCrossAttnProcessor) for p in module.attn_processors.values())
        self.calls.append((args[0].shape[0], torch.is_grad_enabled(), stored))

    def close(self) -> None:
        self.handle.remove()


def test_one_batched_unet_call_per_step_and_nothing_else_when_layout_is_off(glod: GLoDPipeline) -> None:
    before = dict(glod.unet.attn_processors)
    spy = _UNetSpy(glod.unet)
    try:
        _run(glod, _spec([MAN, WOMAN], local_steps=[0.0, 0.5], layout_guidance={"strength": 0}), num_images_per_prompt=2)
    finally:
        spy.close()
    # [uncond, global, man, woman] x 2 images while locals are active, then [uncond, global] x 2
    assert spy.calls == [(8, False, False), (8, False, False), (4, False, False), (4, False, False)]
    assert glod.unet.attn_processors == before


def test_layout_guidance_runs_only_in_its_steps_and_restores_processors(glod: GLoDPipeline) -> None:
    before = dict(glod.unet.attn_processors)
    spec = _spec([MAN, WOMAN], layout_guidance={"strength": 30.0, "steps": 2, "iterations": 2})
    spy = _UNetSpy(glod.unet)
    try:
        out = glod(spec, num_inference_steps=STEPS, generator=_gen(), output_type="np", return_debug=True)
    finally:
        spy.close()
    # debug keeps the store installed (recording the main calls too) until the end
    guide, main = (1, True, True), (4, False, True)
    assert spy.calls == [guide, guide, main, guide, guide, main, main, main]
    assert glod.unet.attn_processors == before
    assert len(out.layout_losses) == 2 and all(0 <= v <= 1 for v in out.layout_losses)
    plain = _run(glod, _spec([MAN, WOMAN]))
    assert np.abs(out.images - plain).max() > 1e-4


def test_layout_guidance_calls_without_debug(glod: GLoDPipeline) -> None:
    spec = _spec([MAN, WOMAN], layout_guidance={"strength": 30.0, "steps": 2, "iterations": 2})
    spy = _UNetSpy(glod.unet)
    try:
        _run(glod, spec)
    finally:
        spy.close()
    guide, main = (1, True, True), (4, False, False)
    # guided steps: 2 gradient passes on the global prompt, then the batched call; the store is
    # removed right after the last guided pass, so the rest are plain calls
    assert spy.calls == [guide, guide, (4, False, True), guide, guide, main, main, main]


def test_layout_step_moves_attention_mass_into_the_box(glod: GLoDPipeline) -> None:
    spec = parse_spec(_spec([MAN, WOMAN]))
    unet, scheduler = glod.unet, glod.scheduler
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    embeds = glod.encode_text([GLOBAL], torch.device("cpu"))
    objects = layout_objects(spec, glod.tokenizer, (8, 8))
    latents = torch.randn(1, 4, 8, 8, generator=_gen(3))

    def loss_at(x: torch.Tensor) -> float:
        store = AttentionStore(detach=True)
        with attention_store(unet, store), store.recording_on(), torch.no_grad():
            unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=embeds)
            return float(layout_loss(store.maps, objects, (8, 8)))

    store = AttentionStore()
    with attention_store(unet, store):
        moved, loss = layout_guidance_step(unet, scheduler, latents, t, embeds, store, objects, strength=0.05)
    assert loss == pytest.approx(loss_at(latents), abs=1e-6)
    assert not torch.equal(moved, latents)
    assert loss_at(moved) < loss_at(latents)


def test_store_processor_output_is_the_original_processors_recording_or_not(glod: GLoDPipeline) -> None:
    x = torch.randn(2, 4, 8, 8, generator=_gen(4))
    embeds = torch.randn(2, 77, 32, generator=_gen(5))
    with torch.no_grad():
        plain = glod.unet(x, 10, embeds).sample
        store = AttentionStore()
        with attention_store(glod.unet, store):
            passed = glod.unet(x, 10, embeds).sample
            with store.recording_on():
                recorded = glod.unet(x, 10, embeds).sample
    assert torch.equal(passed, plain)
    assert torch.equal(recorded, plain)  # recording watches; the output is the original processor's
    # per head: mid block (4x4, one layer) then the cross-attention up block (8x8, three layers)
    heads = glod.unet.mid_block.attentions[0].transformer_blocks[0].attn2.heads
    assert [tuple(m.shape) for m in store.maps] == [(2, heads, 16, 77)] + [(2, heads, 64, 77)] * 3
    for amap in store.maps:
        torch.testing.assert_close(amap.sum(-1), torch.ones(amap.shape[:3]), rtol=0, atol=1e-5)


def _hand_regions(feathered: bool = False) -> torch.Tensor:
    """MAN and WOMAN on the 8 x 8 latent grid, by hand; ``feathered``: a 2-cell inward ramp, so 0.5 on
    the cells along the sides that are not on the image border."""
    man, woman = torch.zeros(8, 8), torch.zeros(8, 8)
    man[1:, :4] = 1  # x 0..32, y 8..64
    woman[1:, 4:] = 1  # x 32..64, y 8..64
    if feathered:
        man[1, :4], man[1:, 3] = 0.5, 0.5
        woman[1, 4:], woman[1:, 4] = 0.5, 0.5
    return torch.stack([man, woman])[:, None]


def test_debug_outputs(glod: GLoDPipeline) -> None:
    spec = _spec([MAN, WOMAN], feather=16)
    out = glod(spec, num_inference_steps=2, generator=_gen(), output_type="np", return_debug=True)
    assert torch.equal(out.local_masks, _hand_regions(feathered=True))
    assert len(out.attention_maps) == 2
    for amap in out.attention_maps:
        assert amap.shape == (1, 8, 8) and float(amap.max()) == pytest.approx(1.0) and float(amap.min()) >= 0
    assert np.array_equal(out.images, _run(glod, spec, num_inference_steps=2))  # debug changes no pixel


def test_boxes_scale_with_the_output_size(glod: GLoDPipeline) -> None:
    big = _spec([{**MAN, "box": [0, 64, 256, 512]}], width=512, height=512)
    out = glod(big, height=64, width=64, num_inference_steps=1, generator=_gen(), output_type="np", return_debug=True)
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.equal(out.local_masks, _hand_regions()[:1])


def test_save_and_load_round_trip(glod: GLoDPipeline, tmp_path: Path) -> None:
    spec = _spec([MAN, WOMAN])
    want = _run(glod, spec)
    glod.save_pretrained(tmp_path / "glod")
    assert list((tmp_path / "glod" / "unet").glob("*.safetensors"))
    loaded = GLoDPipeline.from_pretrained(tmp_path / "glod")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded, spec), want, rtol=0, atol=1e-6)
    generic = DiffusionPipeline.from_pretrained(tmp_path / "glod", trust_remote_code=True)
    assert isinstance(generic, GLoDPipeline)
    # a plain Stable Diffusion folder (as the sd15 hub repo) loads too, without its safety checker
    sd = StableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    from_sd = GLoDPipeline.from_pretrained(tmp_path / "sd")
    from_sd.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(from_sd, spec), want, rtol=0, atol=1e-6)


def test_never_imports_the_module_file(glod: GLoDPipeline, tmp_path: Path) -> None:
    glod.save_pretrained(tmp_path / "glod")
    (tmp_path / "glod" / "pipeline_glod.py").write_text("raise SystemExit('not ours')\n")
    assert isinstance(GLoDPipeline.from_pretrained(tmp_path / "glod"), GLoDPipeline)
    with pytest.raises(ValueError, match="no remote code"):
        GLoDPipeline.from_pretrained(tmp_path / "glod", trust_remote_code=True)


def test_images_of_a_batch_equal_images_generated_alone(glod: GLoDPipeline) -> None:
    """Two global prompts, a local bound to the second, layout guidance on: a batch of N images is
    N independent generations (the composition and the guidance are per image)."""
    spec = _spec(
        [MAN, {"text": "a red hat", "object": "hat", "global_index": 1, "box": [16, 0, 48, 24], "weight": 3.0}],
        global_prompts=[{"text": GLOBAL, "weight": 6.0}, {"text": "a man with a hat", "weight": 1.5}],
        layout_guidance={"strength": 30.0, "steps": 2, "iterations": 1},
    )
    latents = torch.randn(2, 4, 8, 8, generator=_gen(9))
    both = glod(spec, num_inference_steps=3, latents=latents, num_images_per_prompt=2, output_type="np").images
    alone = [glod(spec, num_inference_steps=3, latents=latents[i:i + 1], output_type="np").images[0] for i in range(2)]
    np.testing.assert_allclose(both, np.stack(alone), rtol=0, atol=1e-5)
    assert np.abs(both[0] - both[1]).max() > 1e-3


def test_local_step_range_counts_the_schedulers_real_steps() -> None:
    """PNDM (SD 1.5's scheduler) runs N + 1 UNet steps for N requested: local guidance over the
    whole range must reach the last one too."""
    from diffusers import PNDMScheduler

    parts = tiny_sd_components(0)
    parts["scheduler"] = PNDMScheduler.from_config(parts["scheduler"].config, skip_prk_steps=True)
    pipe = GLoDPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    spy = _UNetSpy(pipe.unet)
    try:
        _run(pipe, _spec([MAN], layout_guidance={"strength": 0}))
        whole = list(spy.calls)
        spy.calls.clear()
        _run(pipe, _spec([MAN], local_steps=[0.0, 0.5], layout_guidance={"strength": 0}))
    finally:
        spy.close()
    assert len(pipe.scheduler.timesteps) == STEPS + 1
    assert whole == [(3, False, False)] * (STEPS + 1)  # [uncond, global, man] at every step
    assert [c[0] for c in spy.calls] == [3, 3, 3, 2, 2]  # first half of the 5: steps 0, 1, 2 (< 2.5)


def test_guidance_scale_at_most_one_is_the_text_row_alone_as_in_diffusers(glod: GLoDPipeline) -> None:
    sd = StableDiffusionPipeline(**tiny_sd_components(0), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    spy = _UNetSpy(glod.unet)
    try:
        got = _run(glod, prompt=GLOBAL, guidance_scale=1.0)
    finally:
        spy.close()
    assert spy.calls == [(1, False, False)] * STEPS
    want = sd(GLOBAL, num_inference_steps=STEPS, guidance_scale=1.0, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_prompt_arguments_fail_clearly(glod: GLoDPipeline) -> None:
    from cnc_model.glod.spec import SpecError

    with pytest.raises(ValueError, match="global weights are its guidance scales"):
        glod(_spec(), guidance_scale=3.0, num_inference_steps=1)
    with pytest.raises(TypeError, match="one `prompt` string"):
        glod(prompt=[GLOBAL, GLOBAL], num_inference_steps=1)
    with pytest.raises(SpecError, match="must not be empty"):
        glod(prompt="  ", num_inference_steps=1)


def test_output_size_from_the_spec_only_where_it_sets_one(glod: GLoDPipeline) -> None:
    unsized = {"global_prompts": [{"text": GLOBAL}], "local_prompts": [{**MAN, "box": [0, 64, 256, 512]}]}
    out = glod(unsized, num_inference_steps=1, generator=_gen(), output_type="np", return_debug=True)
    assert out.images.shape == (1, 64, 64, 3)  # the UNet's default, boxes in the default 512 frame
    assert torch.equal(out.local_masks, _hand_regions()[:1])
    assert _run(glod, _spec(width=128, height=64), num_inference_steps=1).shape == (1, 64, 128, 3)
