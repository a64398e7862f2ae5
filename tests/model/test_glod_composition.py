"""GLoD's composition algebra, regions and token matching (tiny models, exact invariants)."""

from __future__ import annotations

import pytest
import torch

from cnc_model.glod.composition import GLoDComposition, compose_noise, stack_prompt_embeds
from cnc_model.glod.regions import box_mask, mask_to_latent, region_masks
from cnc_model.glod.token_match import TokenMatchError, _by_words, find_token_indices
from cnc_model.tiny import tiny_sd_components, tiny_tokenizer


def _blocks(n: int, blocks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * blocks, 4, 8, 8, generator=g)


def test_one_global_is_classifier_free_guidance_bit_for_bit() -> None:
    pred = _blocks(2, 2)
    uncond, text = pred.chunk(2)
    assert torch.equal(compose_noise(pred, [7.5]), uncond + 7.5 * (text - uncond))


def test_formula_with_globals_and_locals() -> None:
    pred = _blocks(3, 1 + 2 + 2, seed=1)
    u, g1, g2, l1, l2 = pred.chunk(5)
    masks = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2))
    got = compose_noise(pred, [3.0, 2.0], [4.0, 1.5], masks)
    want = u + 3.0 * (g1 - u) + 2.0 * (g2 - u) + 4.0 * masks[0] * (l1 - u) + 1.5 * masks[1] * (l2 - u)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # (L, 1, h, w) and per-image (L, N, 1, h, w) masks mean the same
    torch.testing.assert_close(compose_noise(pred, [3.0, 2.0], [4.0, 1.5], masks[:, None]), got, rtol=0, atol=0)
    per_image = masks[:, None, None].expand(2, 3, 1, 8, 8)
    torch.testing.assert_close(compose_noise(pred, [3.0, 2.0], [4.0, 1.5], per_image), got, rtol=0, atol=0)


def test_zero_region_and_outside_regions_are_exactly_global_only() -> None:
    pred = _blocks(1, 1 + 1 + 2, seed=3)
    masks = torch.zeros(2, 1, 8, 8)
    masks[1, 0, 2:5, 1:6] = torch.rand(3, 5) + 0.1
    global_only = compose_noise(pred[:2], [7.5])
    got = compose_noise(pred, [7.5], [5.0, 5.0], masks)
    outside = (masks.sum(0) == 0).expand_as(got)
    assert torch.equal(got[outside], global_only[outside])
    assert not torch.equal(got[~outside], global_only[~outside])
    # an all-zero region changes nothing anywhere
    assert torch.equal(compose_noise(pred[:3], [7.5], [5.0], masks[:1]), global_only)


def test_local_equal_to_global_with_full_region_raises_global_weight() -> None:
    pred = _blocks(2, 3, seed=4)
    u, g, _ = pred.chunk(3)
    same = torch.cat([u, g, g])
    got = compose_noise(same, [5.0], [2.5], torch.ones(1, 8, 8))
    torch.testing.assert_close(got, compose_noise(same[:4], [7.5]), rtol=0, atol=1e-5)


def test_layout_errors() -> None:
    with pytest.raises(ValueError, match=r"noise_pred has 3 rows, not a multiple of 1 \+ 1 globals \+ 2 locals"):
        compose_noise(_blocks(1, 3), [7.5], [1.0, 1.0], torch.ones(2, 8, 8)[:, None][:, :, :7])
    with pytest.raises(ValueError, match=r"1 local prompts need 1 local masks, got None"):
        compose_noise(_blocks(1, 3), [7.5], [1.0], None)
    with pytest.raises(ValueError, match=r"2 local prompts need 2 local masks, got \(1, 8, 8\)"):
        compose_noise(_blocks(1, 4), [7.5], [1.0, 1.0], torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="^GLoD needs at least one global prompt$"):
        compose_noise(_blocks(1, 1), [])


def test_half_precision_noise_keeps_its_dtype_with_float32_regions() -> None:
    pred = _blocks(1, 3).half()
    got = compose_noise(pred, [7.5], [5.0], torch.ones(1, 8, 8, dtype=torch.float32))
    assert got.dtype == torch.float16


def test_composition_step_range_and_blocks() -> None:
    comp = GLoDComposition([7.5], [5.0], torch.ones(1, 1, 8, 8), (0.25, 0.5))
    active = [comp.locals_active(i, 8) for i in range(8)]
    assert active == [False, False, True, True, False, False, False, False]
    assert comp.num_blocks(True) == 3 and comp.num_blocks(False) == 2
    pred = _blocks(1, 3)
    torch.testing.assert_close(comp(pred, 2, 8), compose_noise(pred, [7.5], [5.0], torch.ones(1, 1, 8, 8)), rtol=0, atol=0)
    assert torch.equal(comp(pred[:2], 0, 8), compose_noise(pred[:2], [7.5]))


def test_stack_prompt_embeds_layout() -> None:
    u, g, l1, l2 = (torch.full((1, 3, 2), float(v)) for v in range(4))
    out = stack_prompt_embeds(u, [g], [l1, l2], num_images=2)
    assert out[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert stack_prompt_embeds(u, [g], [l1, l2])[:, 0, 0].tolist() == [0, 1, 2, 3]  # one image by default


def test_batched_unet_call_equals_prompt_by_prompt() -> None:
    # float64, so that batch-size-dependent float32 rounding (~1e-6) cannot hide a layout bug
    unet = tiny_sd_components(0)["unet"].double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    embeds = [torch.randn(1, 77, 32, generator=gen, dtype=torch.float64) for _ in range(4)]  # uncond, global, 2 locals
    masks = region_masks([(0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 1.0)], (8, 8)).double()
    t = torch.tensor(500)
    with torch.no_grad():
        batched = unet(torch.cat([x] * 4), t, stack_prompt_embeds(embeds[0], embeds[1:2], embeds[2:], 2)).sample
        single = torch.cat([unet(x, t, e.expand(2, -1, -1)).sample for e in embeds])
    torch.testing.assert_close(compose_noise(batched, [7.5], [5.0, 3.0], masks),
                               compose_noise(single, [7.5], [5.0, 3.0], masks), rtol=0, atol=1e-10)
    # outside both regions, eps_hat equals the global-only eps_hat of a separate [uncond, global] call
    with torch.no_grad():
        global_only = compose_noise(unet(torch.cat([x] * 2), t, stack_prompt_embeds(embeds[0], embeds[1:2], (), 2)).sample, [7.5])
    full = compose_noise(batched, [7.5], [5.0, 3.0], masks)
    outside = (masks.sum(0) == 0).expand_as(full)
    assert outside.any()
    torch.testing.assert_close(full[outside], global_only[outside], rtol=0, atol=1e-10)
    assert (full - global_only).abs().max() > 1e-3  # inside, the locals do act


def test_box_mask_coverage_and_feather_stay_inside() -> None:
    m = box_mask((0.25, 0.0, 0.75, 0.5), (8, 8))
    want = torch.zeros(8, 8)
    want[0:4, 2:6] = 1
    assert torch.equal(m, want)
    half = box_mask((0.0, 0.0, 0.5625, 1.0), (8, 8))  # x1 = 4.5 cells: the 5th column half covered
    assert half[0, :6].tolist() == [1, 1, 1, 1, 0.5, 0]
    # the image border is no edge: a whole-image region stays 1 whatever the feather
    assert torch.equal(box_mask((0.0, 0.0, 1.0, 1.0), (8, 8), feather=2), torch.ones(8, 8))
    soft = box_mask((0.25, 0.0, 0.75, 0.5), (8, 8), feather=2)
    assert soft[0].tolist() == [0, 0, 0.5, 1, 1, 0.5, 0, 0] and soft[:5, 3].tolist() == [1, 1, 1, 0.5, 0]
    wide = box_mask((0.25, 0.25, 0.75, 0.75), (8, 8), feather=3)
    assert torch.equal(wide > 0, want.roll(2, 0) > 0) and wide.max() < 1
    # a mask image gives the same hard region as the box
    pixels = torch.zeros(64, 64)
    pixels[0:32, 16:48] = 1
    assert torch.equal(mask_to_latent(pixels, (8, 8)), want)
    soft_mask = mask_to_latent(pixels, (8, 8), feather=2)
    assert torch.equal(soft_mask > 0, want > 0) and soft_mask[0, 2] == 0.5 and soft_mask[1, 3] == 1.0
    # and the same soft edge, on the border and inside
    for feather in (1, 2, 3):
        torch.testing.assert_close(mask_to_latent(pixels, (8, 8), feather), box_mask((0.25, 0.0, 0.75, 0.5), (8, 8), feather),
                                   rtol=0, atol=1e-6)
    inner = torch.zeros(64, 64)
    inner[8:56, 16:40] = 1
    torch.testing.assert_close(mask_to_latent(inner, (8, 8), 2), box_mask((0.25, 0.125, 0.625, 0.875), (8, 8), 2),
                               rtol=0, atol=1e-6)


def test_token_indices_whole_words() -> None:
    tok = tiny_tokenizer()  # byte-level: one token per character
    prompt = "A woman talks with a Man."
    idx = find_token_indices(tok, prompt, "man")
    ids = tok(prompt)["input_ids"]
    assert tok.decode([ids[i] for i in idx]).strip().lower() == "man"
    assert idx == list(range(1 + len("awomantalkswitha"), 1 + len("awomantalkswithaman")))
    assert find_token_indices(tok, prompt, "woman") == list(range(2, 7))
    assert find_token_indices(tok, prompt, "talks  with") == list(range(7, 16))
    with pytest.raises(TokenMatchError, match="not a word"):
        find_token_indices(tok, "a woman", "man")
    with pytest.raises(TokenMatchError, match="token limit"):
        find_token_indices(tok, "x" * 80 + " dog", "dog")


def test_token_fallback_matches_offsets() -> None:
    tok = tiny_tokenizer()
    prompt = "a man with white beard"
    span = (prompt.index("white"), prompt.index("white") + len("white beard"))
    assert _by_words(tok, prompt, *span) == find_token_indices(tok, prompt, "white beard")
