"""Presets and tiny models: names, determinism, offline tokenizer round trip, SD-like structure."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoImageProcessor, CLIPTokenizer

from cnc_model.presets import PRESETS, get_preset
from cnc_model.tiny import tiny_clip_image_encoder, tiny_sd_components, tiny_tokenizer


def test_presets_name_every_model():
    fields = {f.name for f in dataclasses.fields(PRESETS["sd15"])}
    assert {"sd", "sd_inpaint", "depth", "saliency", "clip_image"} <= fields
    sd15 = get_preset("sd15")
    assert sd15.clip_image == "openai/clip-vit-large-patch14" and sd15.depth == "Intel/dpt-large"
    assert sd15.saliency.endswith("u2net.pth") and not sd15.is_tiny
    assert get_preset("tiny").is_tiny and get_preset("tiny").replace(sd="/models/sd").sd == "/models/sd"
    with pytest.raises(ValueError, match="known presets"):
        get_preset("sdxl")


def test_tiny_components_are_seeded():
    a, b, c = tiny_sd_components(0), tiny_sd_components(0), tiny_sd_components(1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)


def test_tiny_structure_mirrors_sd15():
    parts = tiny_sd_components(unet_in_channels=9)
    assert parts["unet"].config.in_channels == 9
    assert 2 ** (len(parts["vae"].config.block_out_channels) - 1) == 8  # SD's VAE factor
    assert parts["text_encoder"].config.hidden_size == parts["unet"].config.cross_attention_dim
    encoder, processor = tiny_clip_image_encoder()
    assert encoder.config.projection_dim == parts["unet"].config.cross_attention_dim
    assert parts["tokenizer"].model_max_length == 77 == parts["text_encoder"].config.max_position_embeddings


def test_tokenizer_round_trips_and_encodes_every_byte(tmp_path):
    tokenizer = tiny_tokenizer()
    text = "A photo of a café, 2 cats & ünïcode!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte has a token
    assert max(ids) < len(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded(text).input_ids == ids and loaded.model_max_length == 77
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_tiny_image_processor_round_trips(tmp_path):
    encoder, processor = tiny_clip_image_encoder()
    processor.save_pretrained(tmp_path)
    assert AutoImageProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()
