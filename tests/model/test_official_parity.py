"""Where the official CnC code decides a result, this project follows it by default (issue 14).

Each test pins one behaviour of github.com/tomtom1103/compose-and-conquer against the rule named
in its docstring; inputs keep fg/bg, left/right and image/mask roles distinguishable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnc_model.annotators.depth import DepthEstimator
from cnc_model.annotators.saliency import SaliencyModel


def _images(n: int, size: tuple[int, int] = (40, 56), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------ item 7: depth preprocessing
def test_depth_official_preprocessing_is_unnormalised_at_512(tmp_path):
    """utils/primitives.py GetDepthMap: MiDaS DPT-Large on [0, 1] images, no mean/std, 512 px."""
    DepthEstimator.tiny(0).save_pretrained(tmp_path / "dpt")
    official = DepthEstimator.from_pretrained(tmp_path / "dpt", device="cpu")
    assert official.input_size == (512, 512) and not official.normalize
    image = _images(1, (64, 64))[0]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    expected = F.interpolate(x, size=(512, 512), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(official.preprocess([image]), expected, rtol=0, atol=0)
    processor = DepthEstimator.from_pretrained(tmp_path / "dpt", device="cpu", preprocessing="processor")
    assert processor.normalize and processor.input_size == (32, 32)
    assert processor.preprocess([image]).min() < 0  # mean/std 0.5 maps [0, 1] to [-1, 1]


def test_sd15_preset_names_the_official_depth_network():
    from cnc_model.presets import get_preset

    assert get_preset("sd15").depth == "Intel/dpt-large"


# ------------------------------------------------------------------ item 8: U2-Net preprocessing
def test_saliency_official_preprocessing_and_threshold():
    """GetSODMask: raw [0, 1] input resized bilinearly, sigmoid > 0.5, binary map resized back."""
    model = SaliencyModel.tiny(0, device="cpu")
    assert model.preprocessing == "official"
    images = _images(2, (40, 56), seed=3)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    net_in = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.preprocess(images), net_in, rtol=0, atol=0)  # no ImageNet mean/std
    with torch.no_grad():
        binary = (model.model(net_in)[0].clamp(0, 1) > 0.5).float()
    expected = F.interpolate(binary, size=(40, 56), mode="bilinear", align_corners=False, antialias=True)[:, 0]
    np.testing.assert_allclose(model.probabilities(images), expected.clamp(0, 1).numpy(), rtol=0, atol=1e-6)
    test_script = SaliencyModel.tiny(0, device="cpu", preprocessing="u2net_test")
    assert not torch.equal(test_script.preprocess(images), net_in)
    with pytest.raises(ValueError, match="preprocessing"):
        SaliencyModel.tiny(0, preprocessing="imagenet")


# ------------------------------------------------------------------ pipeline helpers
from tests.model.conftest import random_depth, random_image  # noqa: E402

CPU = torch.device("cpu")


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 2)
    return pipe("a red cube on a table", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def box_image(left: bool, size: int = 64) -> "PIL.Image.Image":
    """A bright box on black: on the left half or the right half (tells the fg image apart)."""
    import PIL.Image

    array = np.zeros((size, size, 3), np.uint8)
    cols = slice(4, size // 2 - 4) if left else slice(size // 2 + 4, size - 4)
    array[size // 4 : 3 * size // 4, cols] = (230, 180, 60)
    return PIL.Image.fromarray(array)


# ------------------------------------------------------------------ item 1: missing conditions
def test_missing_conditions_follow_the_official_model(trained_like_pipe):
    """models/cnc.py always runs the local fuser (missing depth = zeros) and always appends 4 + 4
    tokens (missing exemplar = the global fuser of zeros, not zero because of its LayerNorms)."""
    pipe = trained_like_pipe
    cond = pipe.prepare_conditions(64, 64, CPU, torch.float32)
    assert cond.fg_depth is not None and not cond.fg_depth.any() and cond.bg_depth is None  # bg: zeros too
    zero = torch.zeros(1, pipe.global_fuser.config.image_embed_dim)
    with torch.no_grad():
        fg_zero, bg_zero = pipe.global_fuser(zero, zero)
    assert torch.equal(cond.fg_tokens, fg_zero) and torch.equal(cond.bg_tokens, bg_zero) and fg_zero.abs().max() > 0
    black_mask = pipe.saliency_mask(torch.zeros(1, 3, 64, 64), 64, 64, CPU)  # the demo's anchor without images
    assert cond.mask is not None and torch.equal(cond.mask, black_mask)
    skip = pipe.prepare_conditions(64, 64, CPU, torch.float32, missing_conditions="skip")
    assert (skip.fg_depth, skip.bg_depth, skip.fg_tokens, skip.mask) == (None, None, None, None)

    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1
    a, b = random_image((48, 40), 1), random_image((40, 48), 2)
    exemplar_only = run(pipe, fg_exemplar=a, bg_exemplar=b, mask=mask)
    zero_depth = torch.zeros(1, 3, 64, 64)
    assert np.array_equal(exemplar_only, run(pipe, fg_exemplar=a, bg_exemplar=b, mask=mask, fg_depth=zero_depth,
                                             bg_depth=zero_depth))
    assert np.abs(exemplar_only - run(pipe, fg_exemplar=a, bg_exemplar=b, mask=mask, missing_conditions="skip")).max() > 1e-4
    depth = dict(fg_depth=random_depth(64, 64, 1), bg_depth=random_depth(64, 64, 2), mask=mask)
    depth_only = run(pipe, **depth)
    assert np.array_equal(depth_only, run(pipe, fg_image_embeds=zero, bg_image_embeds=zero, **depth))
    assert np.abs(depth_only - run(pipe, missing_conditions="skip", **depth)).max() > 1e-4


# ------------------------------------------------------------------ item 2: mask from saliency
def test_mask_defaults_to_saliency_of_the_fg_exemplar(trained_like_pipe):
    """test_cnc.py: the mask is GetSODMask of the fg image, else of the fg exemplar image."""
    pipe = trained_like_pipe
    fg, bg = box_image(left=True), box_image(left=False)
    x = torch.from_numpy(np.array(fg)).permute(2, 0, 1)[None].float() / 255
    expected = pipe.saliency_model.probabilities_tensor(x)  # already 64x64: no resize
    cond = pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_exemplar=fg, bg_exemplar=bg)
    assert torch.equal(cond.mask, expected) and 0 < expected.mean() < 1
    swapped = pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_exemplar=bg, bg_exemplar=fg)
    assert not torch.equal(swapped.mask, cond.mask)  # the fg one decides
    assert np.array_equal(run(pipe, fg_exemplar=fg, bg_exemplar=bg), run(pipe, fg_exemplar=fg, bg_exemplar=bg, mask=expected))
    saliency, pipe.saliency_model = pipe.saliency_model, None
    try:
        with pytest.raises(ValueError, match="saliency"):
            pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_exemplar=fg)
    finally:
        pipe.saliency_model = saliency


# ------------------------------------------------------------------ item 3: fg depth from an image
def test_fg_depth_from_an_image_is_the_depth_of_the_masked_image():
    """test_cnc.py default "v2": fg depth = depth(fg image x its U2-Net mask); v1/v3 as options."""
    from tests.model.conftest import make_cnc_pipeline
    from tests.model.test_pipeline_cnc import tiny_depth_estimator

    pipe = make_cnc_pipeline(randomize_zero_convs=True)
    estimator, processor = tiny_depth_estimator()
    pipe.register_modules(depth_estimator=estimator, depth_processor=processor)
    fg, exemplar = box_image(left=True), box_image(left=False)
    mask = pipe.saliency_mask(fg, 64, 64, CPU)
    assert not torch.equal(mask, pipe.saliency_mask(exemplar, 64, 64, CPU))
    rgb = torch.from_numpy(np.array(fg)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():  # GetDepthMap: MiDaS on the [0, 1] image itself, min-max normalised
        raw_net = estimator(pixel_values=rgb * mask).predicted_depth[:, None]
    expected = (raw_net - raw_net.min()) / (raw_net.max() - raw_net.min()).clamp_min(1e-8)
    cond = pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_depth_image=fg, fg_exemplar=exemplar)
    from cnc_model.cnc.conditioning import prepare_depth

    torch.testing.assert_close(cond.fg_depth, prepare_depth(expected, 64, 64), rtol=0, atol=1e-6)
    assert torch.equal(cond.fg_depth, pipe.estimate_depth(rgb * mask, 64, 64, CPU))
    assert torch.equal(cond.mask, mask)  # the fg image, not the exemplar, anchors the mask
    raw = pipe.estimate_depth(fg, 64, 64, CPU)
    v1 = pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_depth_image=fg, fg_depth_mode="image")
    v3 = pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_depth_image=fg, fg_depth_mode="masked_depth")
    assert torch.equal(v1.fg_depth, raw) and torch.equal(v3.fg_depth, raw * mask)
    assert not torch.equal(cond.fg_depth, raw)
    processor = pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_depth_image=fg, depth_preprocessing="processor")
    assert not torch.equal(processor.fg_depth, cond.fg_depth)  # the processor's resize + mean/std differ


# ------------------------------------------------------------------ item 11: defaults
def test_separate_fg_and_bg_depth_multipliers_and_768_evaluation(trained_like_pipe):
    """test_cnc.py: fg/bg depth controllers scale the maps (clamped); the demo generates at 768."""
    from cnc_model.presets import get_preset

    fg, bg = random_depth(64, 64, 1), random_depth(64, 64, 2)
    cond = trained_like_pipe.prepare_conditions(64, 64, CPU, torch.float32, fg_depth=fg, bg_depth=bg,
                                                fg_depth_scale=1.5, bg_depth_scale=0.5)
    assert torch.equal(cond.fg_depth, (fg * 1.5).clamp(0, 1)) and torch.equal(cond.bg_depth, bg * 0.5)
    assert cond.depth_scale == 1.0  # the residual scale is separate
    assert get_preset("sd15").eval_resolution == 768


# ------------------------------------------------------------------ issue 10 item 7: diffusers callbacks
def test_callback_on_step_end_has_the_diffusers_contract(trained_like_pipe):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((pipe, step, int(timestep), sorted(kwargs)))
        if step == 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    latents = trained_like_pipe("a cube", num_inference_steps=2, output_type="latent", callback_on_step_end=callback,
                                missing_conditions="skip", generator=torch.Generator().manual_seed(0)).images
    timesteps = trained_like_pipe.scheduler.timesteps.tolist()
    assert seen == [(trained_like_pipe, 0, timesteps[0], ["latents"]), (trained_like_pipe, 1, timesteps[1], ["latents"])]
    assert not latents.any()  # the returned latents replaced the pipeline's
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        trained_like_pipe("a cube", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="missing_conditions"):
        trained_like_pipe("a cube", missing_conditions="drop")
    with pytest.raises(ValueError, match="not both"):
        trained_like_pipe("a cube", glod={"global_prompts": [{"text": "a cube", "weight": 7.5}]})


def test_glod_callback_on_step_end_has_the_diffusers_contract():
    from cnc_model.glod.pipeline_glod import GLoDPipeline
    from cnc_model.tiny import tiny_sd_components

    parts = tiny_sd_components(0)
    pipe = GLoDPipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def callback(p, step, timestep, kwargs):
        steps.append((p is pipe, step))
        return {"latents": kwargs["latents"] * 0}

    out = pipe(prompt="a cube", num_inference_steps=2, output_type="latent", callback_on_step_end=callback).images
    assert steps == [(True, 0), (True, 1)] and not out.any()
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(prompt="a cube", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_saliency_model_travels_with_the_saved_pipeline(tmp_path, trained_like_pipe):
    from cnc_model.cnc.pipeline_cnc import CnCPipeline

    trained_like_pipe.save_pretrained(tmp_path)
    loaded = CnCPipeline.from_pretrained(tmp_path)
    fg = box_image(left=True)
    assert loaded.saliency_model is not None and loaded.saliency_model.input_size == 64
    assert torch.equal(loaded.saliency_mask(fg, 64, 64, CPU), trained_like_pipe.saliency_mask(fg, 64, 64, CPU))


# ------------------------------------------------------------------ items 6 and 12: official files
def _save_as_lightning(obj: dict, path) -> None:
    """torch.save ``obj`` as Lightning does: its hyper-parameters an ``AttributeDict`` of
    ``pytorch_lightning`` (a stand-in module here, gone again before loading), numpy in callbacks."""
    import sys
    import types

    names = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")
    parsing = types.ModuleType(names[-1])

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = names[-1], "AttributeDict"
    parsing.AttributeDict = AttributeDict
    sys.modules.update({names[0]: types.ModuleType(names[0]), names[1]: types.ModuleType(names[1]), names[2]: parsing})
    try:
        full = {"epoch": 4, "global_step": 1000, "pytorch-lightning_version": "1.9.0", "state_dict": obj,
                "hyper_parameters": AttributeDict(mode="local", learning_rate=1e-5),
                "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": np.float64(0.25),
                                                                   "history": np.arange(3)}},
                "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]}],
                "lr_schedulers": [], "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}}}
        torch.save(full, path)
    finally:
        for name in names:
            del sys.modules[name]


def test_a_full_uni_controlnet_lightning_checkpoint_initialises_the_local_fuser(tmp_path):
    """prepare_weights.py init_local_fromuni: every same-named key of a real uni.ckpt layout
    (feature_extractor.extractors/zero_convs, zero_convs, the UNet copy); Uni's pre_extractor and
    its content adapter (global_adapter.ff1/ff2/norm1/norm2) have no CnC counterpart."""
    from cnc_model.cnc.convert import load_cnc_checkpoint
    from tests.model.test_convert import CTX, conv, fusers, ldm_local_adapter_shapes

    shapes = {k: s for k, s in ldm_local_adapter_shapes().items() if not k.startswith(("feature_extractor.fg_", "feature_extractor.bg_"))}
    for index, (c_out, c_in) in zip((0, 2, 4, 6, 8), ((32, 21), (64, 32), (64, 64), (128, 64), (128, 128))):
        shapes |= conv(f"feature_extractor.pre_extractor.{index}", c_out, c_in, 3)
    d = CTX
    content = {"ff1.net.0.proj.weight": (8 * d, d), "ff1.net.2.weight": (2 * d, 4 * d), "ff2.net.0.proj.weight": (16 * d, 2 * d),
               "ff2.net.2.weight": (4 * d, 8 * d), "norm1.weight": (d,), "norm2.weight": (2 * d,)}  # fmt: skip
    g = torch.Generator().manual_seed(5)
    uni = {f"local_adapter.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    uni |= {f"global_adapter.{k}": torch.randn(s, generator=g) for k, s in content.items()}
    uni |= {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3), "cond_stage_model.transformer.x": torch.zeros(2),
            "first_stage_model.decoder.conv_out.bias": torch.zeros(3), "betas": torch.zeros(1000)}  # fmt: skip
    path = tmp_path / "uni.ckpt"
    _save_as_lightning(uni, path)
    local, _ = fusers()
    fg_stream = {k: v.clone() for k, v in local.depth_encoder.fg_stream.state_dict().items()}
    converted = load_cnc_checkpoint(path, local_fuser=local, from_uni_controlnet=True)
    assert {k for k in converted.skipped if k.startswith("global_adapter.")} == {f"global_adapter.{k}" for k in content}
    assert {k for k in converted.skipped if k.startswith("local_adapter.")} == {
        f"local_adapter.{k}" for k in shapes if k.startswith("feature_extractor.pre_extractor.")}
    encoder = local.depth_encoder
    assert torch.equal(encoder.extractors[0][0].weight, uni["local_adapter.feature_extractor.extractors.0.0.weight"])
    assert torch.equal(encoder.zero_convs[1].bias, uni["local_adapter.feature_extractor.zero_convs.1.bias"])
    assert torch.equal(local.controlnet_down_blocks[2].weight, uni["local_adapter.zero_convs.2.0.weight"])
    assert all(torch.equal(v, fg_stream[k]) for k, v in encoder.fg_stream.state_dict().items())  # new in CnC


def test_official_files_load_without_arbitrary_unpickling(tmp_path):
    """A Lightning .ckpt loads through the allow-list, safetensors directly; a pickle that needs
    any other global is refused, naming it."""
    import pickle

    from safetensors.torch import save_file

    from cnc_model.cnc.convert import read_checkpoint

    weights = {"local_adapter.zero_convs.0.0.weight": torch.ones(2, 2), "global_adapter.norm1_fg.bias": torch.zeros(3)}
    _save_as_lightning(weights, tmp_path / "cnc_v1.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "cnc_v1.ckpt", weights_only=True)  # what the old loader did
    loaded = read_checkpoint(tmp_path / "cnc_v1.ckpt")
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    save_file(weights, str(tmp_path / "cnc_v1.safetensors"))
    assert read_checkpoint(tmp_path / "cnc_v1.safetensors").keys() == weights.keys()
    torch.save({"state_dict": weights, "payload": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="_Payload"):
        read_checkpoint(tmp_path / "evil.ckpt")


class _Payload:
    """Anything outside the allow-list (a real attack would run code in __reduce__)."""


# ------------------------------------------------------------------ item 13: GLoD layout guidance
def test_layout_loss_is_per_token_and_per_head_as_compute_ca_loss():
    """layout-guidance utils.compute_ca_loss: (1 - inside/total)^2 per head and per token, then means."""
    from cnc_model.glod.layout_guidance import LayoutObject, layout_loss

    region = torch.zeros(2, 2)
    region[:, 0] = 1  # the left column
    maps = torch.full((1, 2, 4, 3), 1e-9)  # (rows, heads, 2x2 queries, tokens 0..2)
    maps[0, 0, [0, 2], 1] = 0.5  # head 0, token 1: all mass inside (left)
    maps[0, 1, [1, 3], 1] = 0.5  # head 1, token 1: all mass outside (right)
    maps[0, :, [0, 2], 2] = 0.5  # token 2: inside for both heads
    obj = LayoutObject(rows=slice(0, 1), tokens=[1, 2], region=region)
    # per head/token: token 1 -> mean(0, 1) = 0.5; token 2 -> 0; object: mean over tokens = 0.25
    torch.testing.assert_close(layout_loss([maps], [obj], (2, 2)), torch.tensor(0.25), rtol=0, atol=1e-6)
    # averaging heads and tokens first (the old rule) would give (1 - 0.75)^2 = 0.0625


def test_layout_guidance_defaults_follow_the_reference():
    """base_config.yaml: loss_scale 30, max_index_step 10, max_iter 5 while loss > 0.2; mid + first up block."""
    from cnc_model.glod.layout_guidance import (
        AttentionStore, LayoutObject, attention_store, cross_attention_layers, layout_guidance_step)
    from cnc_model.glod.pipeline_glod import GLoDPipeline
    from cnc_model.glod.spec import LayoutGuidance
    from cnc_model.tiny import tiny_sd_components

    defaults = LayoutGuidance()
    assert (defaults.strength, defaults.steps, defaults.iterations, defaults.loss_threshold) == (30.0, 10, 5, 0.2)
    assert defaults.layers == ("mid", "first_up") and defaults.enabled
    pipe = GLoDPipeline(**tiny_sd_components(0))
    pipe.set_progress_bar_config(disable=True)
    layers = cross_attention_layers(pipe.unet)
    assert layers and all(n.startswith(("mid_block.", "up_blocks.1.")) for n in layers)
    assert any(n.startswith("up_blocks.1.") for n in layers) and any(n.startswith("mid_block.") for n in layers)

    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        embeds = pipe.encode_text(["a man and a woman"], CPU)
        region = torch.zeros(8, 8)
        region[:, :4] = 1
        objects = [LayoutObject(rows=slice(0, 1), tokens=[2], region=region)]
        pipe.scheduler.set_timesteps(4)
        t = pipe.scheduler.timesteps[0]
        with attention_store(pipe.unet, AttentionStore()) as store:
            same, carried = layout_guidance_step(pipe.unet, pipe.scheduler, latents, t, embeds, store, objects, 30.0,
                                                 iterations=5, loss_threshold=0.2, last_loss=0.1)
            assert calls == [] and torch.equal(same, latents) and carried == 0.1  # below the threshold: no step
            _, loss = layout_guidance_step(pipe.unet, pipe.scheduler, latents, t, embeds, store, objects, 30.0,
                                           iterations=5, loss_threshold=0.0)
            assert len(calls) == 5 and 0 <= loss <= 1  # threshold 0: every iteration
    finally:
        hook.remove()

    spec = {"width": 64, "height": 64, "global_prompts": [{"text": "a man and a woman", "weight": 7.5}],
            "local_prompts": [{"text": "a man with a beard", "object": "man", "box": [0, 0, 32, 64], "weight": 4.0}]}
    out = pipe(spec, num_inference_steps=3, output_type="latent", return_debug=True, generator=torch.Generator().manual_seed(0))
    assert len(out.layout_losses) == 3  # on by default in a spec with local prompts, in the first steps
    off = pipe({**spec, "layout_guidance": {"strength": 0}}, num_inference_steps=3, output_type="latent",
               return_debug=True, generator=torch.Generator().manual_seed(0))
    assert off.layout_losses == [] and not torch.equal(off.images, out.images)
