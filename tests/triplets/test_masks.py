"""Mask arithmetic: exact binarisation, dilation equal to scipy.ndimage.binary_dilation, I_f = I_s * M."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from tasks.triplets import masks as M


@pytest.mark.parametrize("size", [1, 2, 3, 6, 7, 50])
def test_dilation_is_scipy_binary_dilation(size):
    """The reference (data/get_background.py) calls scipy's binary_dilation with a square of ones."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(size)
    mask = np.where(rng.random((61, 47)) > 0.97, 255, 0).astype(np.uint8)
    expected = ndimage.binary_dilation(mask > 0, structure=np.ones((size, size), bool))
    assert np.array_equal(M.dilate(mask, size), np.where(expected, 255, 0).astype(np.uint8))


def test_dilation_of_one_pixel_is_the_scipy_square():
    mask = np.zeros((100, 100), np.uint8)
    mask[50, 50] = 255
    out = M.dilate(mask, 50)
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 74, 25, 74)
    assert np.count_nonzero(out) == 50 * 50 and set(np.unique(out)) == {0, 255}


@pytest.mark.parametrize("side, expected", [(512, 50), (256, 25), (128, 13), (64, 6), (1024, 100), (4, 1)])
def test_dilation_scales_with_image_size(side, expected):
    assert M.dilation_size(side, side) == expected
    assert M.dilation_size(side, 2 * side) == expected  # the shorter side counts


def test_binarize_is_strict():
    out = M.binarize(np.array([[0, 127, 128, 255]], np.uint8))
    assert out.tolist() == [[0, 0, 255, 255]] and out.dtype == np.uint8


def test_decode_mask_binarises_gray_levels():
    buf = io.BytesIO()
    PIL.Image.fromarray(np.array([[0, 1, 200, 255]], np.uint8)).save(buf, format="PNG")
    assert M.decode_mask(buf.getvalue()).tolist() == [[0, 0, 255, 255]]


def test_foreground_is_source_times_mask_exactly():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.where(rng.random((16, 16)) > 0.5, 255, 0).astype(np.uint8)
    fg = M.foreground(src, mask)
    assert fg.dtype == np.uint8 and np.array_equal(fg, src * (mask[..., None] // 255))
    assert np.array_equal(M.decode_image(M.encode_png(fg)), fg)  # PNG keeps it exact


def test_area_fraction_and_blank_images():
    mask = np.zeros((10, 10), np.uint8)
    mask[:3, :5] = 255
    assert M.area_fraction(mask) == 0.15
    assert M.is_blank(np.zeros((8, 8, 3), np.uint8)) and M.is_blank(np.full((8, 8, 3), 250, np.uint8))
    img = np.zeros((8, 8, 3), np.uint8)
    img[0, 0] = 40
    assert not M.is_blank(img)


def test_paste_unmasked_keeps_the_source_outside_the_mask():
    src = np.full((4, 4, 3), 10, np.uint8)
    gen = np.full((4, 4, 3), 200, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 255
    out = M.paste_unmasked(gen, src, mask)
    assert np.array_equal(out[mask > 0], gen[mask > 0]) and np.array_equal(out[mask == 0], src[mask == 0])


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_gives_rgb_for_gray_and_rgba_sources():
    """Gray and RGBA sources exist in web datasets; the triplet columns are HxWx3 whatever came in."""
    gray = np.array([[0, 90], [180, 255]], np.uint8)
    assert np.array_equal(M.decode_image(_png_bytes(gray, "L")), np.repeat(gray[..., None], 3, axis=2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 7
    out = M.decode_image(_png_bytes(rgba, "RGBA"))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8 and out[0, 0].tolist() == [200, 100, 50]


def test_decode_mask_of_an_rgb_mask_is_one_channel():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[:, 1:] = 255  # white object on black, saved as RGB
    out = M.decode_mask(_png_bytes(rgb, "RGB"))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 255, 255], [0, 255, 255]]


def test_paste_unmasked_stays_uint8():
    """The background column is PNG-encoded: a float result would not be a valid RGB image."""
    out = M.paste_unmasked(np.full((2, 2, 3), 200, np.uint8), np.full((2, 2, 3), 10, np.uint8),
                           np.array([[255, 0], [0, 0]], np.uint8))
    assert out.dtype == np.uint8 and out[..., 0].tolist() == [[200, 10], [10, 10]]


@pytest.mark.parametrize("spread, blank", [(8, True), (9, False)])
def test_is_blank_tolerance_is_inclusive_and_eight_by_default(spread, blank):
    """The range max - min may reach the tolerance (8, as the filter stage's default) and still count as flat."""
    img = np.full((4, 4, 3), 100, np.uint8)
    img[0, 0, 0] = 100 + spread
    assert M.is_blank(img) is blank
    assert M.is_blank(img, tolerance=spread) is True and M.is_blank(img, tolerance=spread - 1) is False
