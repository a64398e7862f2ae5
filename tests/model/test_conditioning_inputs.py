"""Condition inputs by hand: every image type and layout ``_to_float_tensor`` accepts (8- and
16-bit arrays, bool masks, HWC and BHWC arrays, CHW tensors, PIL images) lands as ``(B, C, H, W)``
in [0, 1] with each value in its place; the errors name the input; ``prepare_depth`` keeps three
channels and resizes to (height, width) as documented; ``expand_batch`` and ``per_image`` lay the
batch out as the UNet calls expect. Written to kill the mutants of ``conditioning.py`` that
survived ``make mutants`` (docs/testing.md). Shapes are all different (B != C != H != W)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from cnc_model.cnc.conditioning import CnCConditions, _to_float_tensor, cnc_noise_prediction, expand_batch, prepare_depth

B, H, W = 2, 5, 7


def _ramp(*shape: int) -> np.ndarray:
    """Distinct values in [0, 1] for every position, so a wrong permutation shows."""
    n = int(np.prod(shape))
    return (np.arange(n, dtype=np.float32) / (n - 1)).reshape(shape)


def test_uint8_uint16_and_bool_arrays_are_scaled_to_unit_values() -> None:
    u8 = np.array([[0, 51, 255]], np.uint8)
    assert torch.equal(_to_float_tensor(u8, "x"), torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    u16 = np.array([[0, 13107, 65535]], np.uint16)  # 16-bit depth PNGs: 13107 / 65535 = 0.2
    assert torch.equal(_to_float_tensor(u16, "x"), torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    assert _to_float_tensor(np.array([[True, False]]), "x").tolist() == [[[[1.0, 0.0]]]]
    assert _to_float_tensor(np.array([[0.25, 0.5]], np.float64), "x").dtype == torch.float32


def test_array_layouts_hwc_and_bhwc_become_bchw() -> None:
    hwc = _ramp(H, W, 3)
    got = _to_float_tensor(hwc, "x")
    assert got.shape == (1, 3, H, W) and torch.equal(got[0], torch.from_numpy(hwc).permute(2, 0, 1))
    bhwc = _ramp(B, H, W, 4)
    got = _to_float_tensor(bhwc, "x")
    assert got.shape == (B, 4, H, W) and torch.equal(got, torch.from_numpy(bhwc).permute(0, 3, 1, 2))
    hw = _ramp(H, W)
    assert torch.equal(_to_float_tensor(hw, "x"), torch.from_numpy(hw)[None, None])


def test_tensor_layouts_hw_chw_and_bchw() -> None:
    chw = torch.from_numpy(_ramp(3, H, W))
    assert torch.equal(_to_float_tensor(chw, "x"), chw[None])
    assert torch.equal(_to_float_tensor(chw[0], "x"), chw[0][None, None])
    bchw = torch.from_numpy(_ramp(B, 1, H, W)).double()
    got = _to_float_tensor(bchw, "x")
    assert got.dtype == torch.float32 and torch.equal(got, bchw.float())


def test_pil_images_keep_their_channels() -> None:
    rgb = (_ramp(H, W, 3) * 255).round().astype(np.uint8)
    got = _to_float_tensor(PIL.Image.fromarray(rgb), "x")
    assert torch.equal(got, torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    assert _to_float_tensor(PIL.Image.fromarray(rgb[..., 0]), "x").shape == (1, 1, H, W)


def test_the_ends_of_the_unit_range_are_valid_and_outside_it_is_not() -> None:
    assert torch.equal(_to_float_tensor(torch.tensor([[0.0, 1.0]]), "x"), torch.tensor([[[[0.0, 1.0]]]]))
    for bad in (torch.tensor([[0.0, 1.0001]]), torch.tensor([[-0.0001, 1.0]])):
        with pytest.raises(ValueError, match=r"^fg depth: values must lie in \[0, 1\]"):
            _to_float_tensor(bad, "fg depth")
    with pytest.raises(ValueError, match="^mask: contains NaN"):
        _to_float_tensor(torch.tensor([[0.5, float("nan")]]), "mask")
    with pytest.raises(ValueError, match="^mask: contains NaN or infinite"):
        _to_float_tensor(torch.tensor([[0.5, float("inf")]]), "mask")
    with pytest.raises(ValueError, match=r"^bg depth: expected 1, 3 or 4 channels, got shape \(1, 2, 5, 7\)"):
        _to_float_tensor(torch.zeros(1, 2, H, W), "bg depth")
    with pytest.raises(TypeError, match="^fg depth: expected a PIL image, numpy array or tensor, got list"):
        _to_float_tensor([[0.5]], "fg depth")


def test_prepare_depth_gives_three_channels_at_the_requested_height_and_width() -> None:
    gray = torch.from_numpy(_ramp(1, 1, H, W))
    same = prepare_depth(gray, H, W)
    assert same.shape == (1, 3, H, W) and all(torch.equal(same[0, c], gray[0, 0]) for c in range(3))
    assert same.is_contiguous()
    rgba = torch.from_numpy(_ramp(B, 4, H, W))
    assert torch.equal(prepare_depth(rgba, H, W), rgba[:, :3])  # alpha dropped, no resize
    resized = prepare_depth(rgba, 4, 6)  # height 4, width 6
    want = F.interpolate(rgba[:, :3], size=(4, 6), mode="bilinear", align_corners=False, antialias=True)
    assert resized.shape == (B, 3, 4, 6) and torch.equal(resized, want)


def test_expand_batch_tiles_blocks_and_rejects_uneven_batches() -> None:
    one = torch.tensor([[7.0]])
    assert expand_batch(one, 3).tolist() == [[7.0]] * 3
    two = torch.tensor([[1.0], [2.0]])
    assert expand_batch(two, 2) is two
    assert expand_batch(two, 6).flatten().tolist() == [1, 2, 1, 2, 1, 2]  # [uncond, text, ...] blocks
    with pytest.raises(ValueError, match="cannot spread a batch of 2 conditions over 3 samples"):
        expand_batch(two, 3)


def test_per_image_repeats_each_prompt_row_and_keeps_the_settings() -> None:
    rows = torch.tensor([1.0, 2.0])[:, None, None, None].expand(2, 3, 2, 2).contiguous()
    single = torch.full((1, 1, 2, 2), 9.0)
    tokens = torch.tensor([[10.0], [20.0]])[:, :, None].expand(2, 4, 3)
    cond = CnCConditions(fg_depth=rows, bg_depth=single, fg_tokens=tokens, bg_tokens=tokens + 1, mask=rows[:, :1],
                         depth_scale=0.3, mask_resize="area")
    assert cond.per_image(1) is cond
    out = cond.per_image(3)
    assert out.fg_depth[:, 0, 0, 0].tolist() == [1, 1, 1, 2, 2, 2]  # interleaved, as the prompts are
    assert out.mask[:, 0, 0, 0].tolist() == [1, 1, 1, 2, 2, 2]
    assert out.fg_tokens[:, 0, 0].tolist() == [10, 10, 10, 20, 20, 20]
    assert out.bg_tokens[:, 0, 0].tolist() == [11, 11, 11, 21, 21, 21]
    assert out.bg_depth is single  # a batch of 1 stays one row, broadcast later
    assert out.depth_scale == 0.3 and out.mask_resize == "area"
    none = CnCConditions(fg_depth=rows).per_image(2)
    assert none.bg_depth is None and none.mask is None and none.fg_tokens is None


def test_mask_errors_name_the_mask() -> None:
    from cnc_model.cnc.conditioning import prepare_mask

    with pytest.raises(ValueError, match=r"^mask: values must lie in \[0, 1\]"):
        prepare_mask(torch.tensor([[0.5, 2.0]]))
    with pytest.raises(ValueError, match=r"^depth map: values must lie in \[0, 1\]"):
        prepare_depth(torch.tensor([[0.5, 2.0]]), 1, 2)


def test_context_is_text_then_fg_then_bg_tokens_in_the_text_dtype() -> None:
    """fp16 text embeddings with fp32 tokens (as the global fuser may give) must not promote the context."""
    fg, bg = torch.full((1, 4, 3), 1.0), torch.full((1, 4, 3), 2.0)
    text = torch.zeros(2, 5, 3, dtype=torch.float16)
    context = CnCConditions(fg_tokens=fg, bg_tokens=bg).context(text)
    assert context.dtype == torch.float16 and context.shape == (2, 13, 3)
    assert context[:, :, 0].tolist() == [[0] * 5 + [1] * 4 + [2] * 4] * 2


class _Recorder(torch.nn.Module):
    """Stands in for the UNet or the local fuser: records its arguments, returns zeros."""

    def __init__(self, residuals: bool = False) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.residuals = residuals

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.calls.append(dict(encoder_hidden_states=encoder_hidden_states, **kwargs))
        if self.residuals:
            return (torch.zeros_like(sample),), torch.zeros_like(sample)
        return (torch.zeros_like(sample),)


def test_soft_guidance_takes_the_conditions_token_counts_and_resize_rule() -> None:
    cond = CnCConditions(fg_tokens=torch.zeros(1, 3, 5), bg_tokens=torch.zeros(1, 2, 5),
                         mask=torch.ones(1, 1, 4, 4), mask_resize="area")
    guidance = cond.soft_guidance((4, 4), 2)
    assert (guidance.num_fg_tokens, guidance.num_bg_tokens, guidance.mask_resize) == (3, 2, "area")


def test_per_prompt_masks_are_tiled_over_the_unet_batch() -> None:
    """Two prompts, each with its mask, under CFG: the UNet batch is [uncond_1, uncond_2, text_1, text_2]."""
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, ..., :2] = 1  # prompt 1: left half
    mask[1, ..., 2:, :] = 1  # prompt 2: bottom half
    cond = CnCConditions(fg_tokens=torch.zeros(2, 4, 3), bg_tokens=torch.zeros(2, 4, 3), mask=mask)
    unet = _Recorder()
    cnc_noise_prediction(unet, None, torch.zeros(4, 4, 4, 4), 5, torch.zeros(4, 2, 3), cond)
    guidance = unet.calls[0]["cross_attention_kwargs"]["soft_guidance"]
    assert torch.equal(guidance.mask, torch.cat([mask, mask]))


@pytest.mark.parametrize("given", ["fg", "bg"])
def test_a_missing_depth_map_reaches_the_local_fuser_as_zeros(given: str) -> None:
    depth = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = CnCConditions(**{f"{given}_depth": depth}, depth_scale=0.7)
    fuser, unet = _Recorder(residuals=True), _Recorder()
    cnc_noise_prediction(unet, fuser, torch.zeros(2, 4, 1, 1), 5, torch.zeros(2, 2, 3), cond)
    call = fuser.calls[0]
    other = "bg" if given == "fg" else "fg"
    assert torch.equal(call[f"{given}_depth"], depth.expand(2, -1, -1, -1))
    assert torch.equal(call[f"{other}_depth"], torch.zeros(2, 3, 8, 8))
    assert call["conditioning_scale"] == 0.7
    assert "down_block_additional_residuals" in unet.calls[0]
