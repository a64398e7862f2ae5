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
