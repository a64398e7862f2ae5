"""VAE latents for fast training: real loading path (an SD folder's vae/) and determinism."""

from __future__ import annotations

import numpy as np

from cnc_model.annotators.latents import LatentEncoder
from cnc_model.tiny import tiny_sd_components


def test_latents_load_from_an_sd_folder_and_match_the_in_memory_vae(tmp_path):
    vae = tiny_sd_components(0)["vae"]
    vae.save_pretrained(tmp_path / "sd" / "vae")
    images = [np.random.default_rng(i).integers(0, 256, (64, 48, 3), dtype=np.uint8) for i in range(2)]
    direct = LatentEncoder(vae, device="cpu").encode(images)
    loaded = LatentEncoder.from_pretrained(tmp_path / "sd", device="cpu").encode(images)
    assert direct.shape == (2, 4, 8, 6) and direct.dtype == np.float16
    assert np.array_equal(direct, loaded)
    assert np.array_equal(direct, LatentEncoder(vae, device="cpu").encode(images))  # posterior mean, no sampling
    assert not np.array_equal(direct[0], direct[1])
