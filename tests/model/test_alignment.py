"""CLIP global / local alignment scores on a tiny seeded CLIP (no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from cnc_model.metrics.alignment import CLIPAligner, crop, to_tensor
from cnc_model.tiny import tiny_tokenizer

PROMPTS = ["a man with white beard", "a red car", "a cat on a sofa"]


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, object]:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), tok


@pytest.fixture(scope="module")
def aligner() -> CLIPAligner:
    model, tok = tiny_clip()
    return CLIPAligner(model, tok, batch_size=2)


def _images(n: int, size=(48, 40)) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_scores_are_clip_cosines(aligner: CLIPAligner) -> None:
    images = _images(3)
    scores = aligner.global_alignment(images, PROMPTS)
    assert scores.shape == (3,) and bool((scores.abs() <= 1).all())
    # CLIPModel's own logits are logit_scale * cosine on the same pixels and tokens
    pixels = aligner.preprocess([to_tensor(im) for im in images])
    tokens = aligner.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = aligner.model(input_ids=tokens.input_ids, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(scores * aligner.model.logit_scale.exp(), logits.diagonal(), rtol=0, atol=1e-4)


def test_batching_does_not_change_scores(aligner: CLIPAligner) -> None:
    images = _images(3)
    batched = aligner.global_alignment(images, PROMPTS)  # batch_size=2: two chunks
    single = torch.cat([aligner.global_alignment([im], [p]) for im, p in zip(images, PROMPTS)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)


def test_input_kinds_agree(aligner: CLIPAligner) -> None:
    image = _images(1)[0]
    arr = np.array(image)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    scores = [aligner.global_alignment([x], PROMPTS[:1]) for x in (image, arr, tensor)]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_local_alignment_scores_the_crop(aligner: CLIPAligner) -> None:
    images = _images(2)
    boxes = [(4, 2, 30, 36), (0, 0, 48, 40)]
    local = aligner.local_alignment(images, boxes, PROMPTS[:2])
    cropped = [images[0].crop(boxes[0]), images[1]]
    assert torch.equal(local, aligner.global_alignment(cropped, PROMPTS[:2]))
    # the whole-image box is the global score (scored alone here: batch-size rounding only)
    torch.testing.assert_close(local[1:], aligner.global_alignment(images[1:], PROMPTS[1:2]), rtol=0, atol=1e-6)
    # a different crop gives a different score
    assert not torch.equal(aligner.local_alignment(images[:1], [(20, 10, 48, 40)], PROMPTS[:1]), local[:1])


def test_crop_is_clamped_to_the_image() -> None:
    image = torch.rand(3, 10, 20)
    assert crop(image, (-5, -5, 100, 100)).shape == (3, 10, 20)
    assert crop(image, (25, 12, 30, 14)).shape == (3, 1, 1)


def test_length_mismatch_and_empty(aligner: CLIPAligner) -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        aligner.global_alignment(_images(2), PROMPTS[:1])
    with pytest.raises(ValueError, match="must match"):
        aligner.local_alignment(_images(1), [(0, 0, 4, 4)] * 2, PROMPTS[:1])
    assert aligner.global_alignment([], []).shape == (0,)


def test_from_pretrained_round_trip(aligner: CLIPAligner, tmp_path: Path) -> None:
    aligner.model.save_pretrained(tmp_path)
    aligner.tokenizer.save_pretrained(tmp_path)
    loaded = CLIPAligner.from_pretrained(str(tmp_path))
    images = _images(2)
    torch.testing.assert_close(loaded.global_alignment(images, PROMPTS[:2]),
                               aligner.global_alignment(images, PROMPTS[:2]), rtol=0, atol=1e-6)


def test_spec_alignment_scores_each_prompt(aligner: CLIPAligner, tmp_path: Path) -> None:
    from cnc_model.metrics.alignment import spec_alignment
    from cnc_model.glod.spec import parse_spec

    PIL.Image.fromarray(np.pad(np.full((20, 10), 255, np.uint8), ((0, 0), (5, 5)))).save(tmp_path / "m.png")
    spec = parse_spec({
        "width": 96, "height": 80,
        "global_prompts": [{"text": "a man and a car"}, {"text": "a red car"}],
        "local_prompts": [{"text": "a man with white beard", "object": "man", "box": [8, 4, 60, 72]},
                          {"text": "a cat on a sofa", "object": "car", "mask": str(tmp_path / "m.png")}],
    })
    images = _images(2)  # 48x40: half the spec's frame
    scores = spec_alignment(aligner, images, [spec, spec])
    assert [len(s["global"]) for s in scores] == [2, 2] and [len(s["local"]) for s in scores] == [2, 2]
    want_global = aligner.global_alignment([images[1]] * 2, ["a man and a car", "a red car"])
    # mask 20x20 with columns 5..14 on: its box scales to x 12..36, y 0..40 of the 48x40 image
    want_local = aligner.local_alignment([images[1]] * 2, [(4, 2, 30, 36), (12, 0, 36, 40)],
                                         ["a man with white beard", "a cat on a sofa"])
    np.testing.assert_allclose(scores[1]["global"], want_global.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores[1]["local"], want_local.numpy(), rtol=0, atol=1e-6)
