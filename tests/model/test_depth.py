"""DepthEstimator: normalised inverse depth, 16-bit PNG codec, save/load round trip."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from cnc_model.annotators.depth import (
    DepthEstimator,
    decode_depth_png16,
    depth_to_rgb,
    encode_depth_png16,
    normalize_per_image,
)


@pytest.fixture(scope="module")
def estimator() -> DepthEstimator:
    return DepthEstimator.tiny(seed=0)


def images(n: int, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_predict_is_per_image_normalised_at_input_size(estimator):
    depth = estimator.predict(images(3))
    assert depth.shape == (3, 48, 48) and depth.dtype == np.float32
    assert np.isfinite(depth).all()
    assert np.allclose(depth.min(axis=(1, 2)), 0.0) and np.allclose(depth.max(axis=(1, 2)), 1.0)


def test_normalisation_handles_flat_and_non_finite_maps():
    maps = np.stack([np.full((4, 4), 3.0), np.arange(16.0).reshape(4, 4)])
    maps[1, 0, 0] = np.nan
    out = normalize_per_image(maps)
    assert np.array_equal(out[0], np.zeros((4, 4), np.float32))
    assert np.isfinite(out).all() and out[1].max() == 1.0 and out[1, 0, 0] == 0.0


def test_png16_round_trip_is_exact_on_the_16_bit_grid():
    rng = np.random.default_rng(1)
    depth = rng.integers(0, 65536, (20, 30)).astype(np.float64) / 65535
    data = encode_depth_png16(depth)
    img = PIL.Image.open(io.BytesIO(data))
    assert img.mode == "I;16" and img.size == (30, 20)
    assert np.array_equal(np.asarray(img), np.rint(depth * 65535).astype(np.uint16))
    assert np.abs(decode_depth_png16(data) - depth).max() < 1e-6
    with pytest.raises(ValueError, match="16-bit"):
        buf = io.BytesIO()
        PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
        decode_depth_png16(buf.getvalue())


def test_depth_as_three_channel_image():
    d = np.array([[0.0, 0.5], [1.0, 0.25]])
    rgb = depth_to_rgb(d)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], [[0, 128], [255, 64]])
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(depth_to_rgb(np.array([[65535]], np.uint16)), [[[255, 255, 255]]])


def test_save_and_load_give_the_same_predictions(estimator, tmp_path):
    estimator.save_pretrained(tmp_path / "dpt")
    assert (tmp_path / "dpt" / "preprocessor_config.json").is_file()
    loaded = DepthEstimator.from_pretrained(tmp_path / "dpt", device="cpu", preprocessing="processor")
    assert loaded.input_size == estimator.input_size and loaded.image_mean == estimator.image_mean
    x = images(2, seed=4)
    assert np.array_equal(loaded.predict(x), estimator.predict(x))


def test_different_seeds_are_different_models():
    x = images(1, seed=2)
    assert not np.array_equal(DepthEstimator.tiny(0).predict(x), DepthEstimator.tiny(1).predict(x))
