"""prepare_image / prepare_label_map: geometry, orientation, modes, draft decoding, rejects."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from tasks.imaging import (
    COCO_THING_IDS, RejectError, crop_geometry, prepare_image, prepare_label_map, things_mask,
)
from tests.fixtures.bad_inputs import bomb_png, corrupt_jpeg, truncated_jpeg
from tests.fixtures.formats import encode, label_png, photo, synthetic_label_map


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.int16)


def full_resize_then_crop(img: Image.Image, size: int) -> np.ndarray:
    """The reference recipe (torchvision Resize + CenterCrop), written out the slow way."""
    (nw, nh), _ = crop_geometry(img.width, img.height, size)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    out = img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return np.asarray(out, dtype=np.int16)


@pytest.mark.parametrize(("w", "h", "size", "resized", "box"), [
    (640, 427, 512, (767, 512), (128 * 640 / 767, 0.0, 640 * 640 / 767, 427.0)),
    (300, 600, 100, (100, 200), (0.0, 150.0, 300.0, 450.0)),
    (256, 256, 64, (64, 64), (0.0, 0.0, 256.0, 256.0)),
])
def test_crop_geometry_matches_torchvision_recipe(w, h, size, resized, box):
    got_resized, got_box = crop_geometry(w, h, size)
    assert got_resized == resized
    assert got_box == pytest.approx(box)


def test_output_is_a_deterministic_rgb_jpeg_of_the_requested_size():
    data = encode(photo("astronaut.png", (300, 220)), "PNG")
    a, b = prepare_image(data, 96), prepare_image(data, 96)
    assert a == b
    img = Image.open(io.BytesIO(a.jpeg))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 96))
    assert (a.width, a.height, a.orig_width, a.orig_height) == (96, 96, 300, 220)
    assert prepare_image(data, 96, quality=60).jpeg != a.jpeg


def test_crop_equals_full_resize_then_centre_crop():
    img = photo("astronaut.png", (300, 220))
    got = pixels(prepare_image(encode(img, "PNG"), 128, quality=100).jpeg)
    want = full_resize_then_crop(img, 128)
    want_jpeg = pixels(encode(Image.fromarray(want.astype(np.uint8)), "JPEG", quality=100, subsampling="4:2:0"))
    assert np.abs(got - want_jpeg).mean() < 0.1  # the same pixels, up to rounding at the crop's border


def test_large_jpeg_is_draft_decoded_and_close_to_the_full_decode(monkeypatch):
    img = photo("rocket.jpg", (2048, 1365))
    data = encode(img, "JPEG", quality=95)
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.decoderconfig[0] if self.decoderconfig else 1)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    got = prepare_image(data, 256)
    assert scales == [4]  # 1365 / 4 >= 256 > 1365 / 8
    assert (got.orig_width, got.orig_height) == (2048, 1365)
    want = full_resize_then_crop(Image.open(io.BytesIO(data)).convert("RGB"), 256)
    assert np.abs(pixels(got.jpeg) - want).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image_exactly(orientation):
    upright = photo("chelsea.png", (150, 100))
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(undo[orientation]) if orientation in undo else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = prepare_image(encode(stored, "PNG", exif=exif.tobytes()), 64)
    want = prepare_image(encode(upright, "PNG"), 64)
    assert got.jpeg == want.jpeg
    assert (got.orig_width, got.orig_height) == (150, 100)


def test_modes_convert_to_rgb():
    rgb = photo("coffee.png", (120, 90))
    gray8 = np.asarray(rgb.convert("L"), dtype=np.int16)
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    assert gray16.mode == "I;16"
    from_16 = prepare_image(encode(gray16, "PNG"), 90, min_side=8, quality=100)
    from_8 = prepare_image(encode(rgb.convert("L"), "PNG"), 90, min_side=8, quality=100)
    assert np.abs(pixels(from_16.jpeg) - pixels(from_8.jpeg)).max() <= 1
    assert "16bit" in from_16.flags

    cmyk = prepare_image(encode(rgb.convert("CMYK"), "TIFF"), 90, min_side=8, quality=100)
    assert np.abs(pixels(cmyk.jpeg) - full_resize_then_crop(rgb, 90)).mean() < 3
    assert "cmyk" in cmyk.flags


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode):
    img = Image.new("RGBA", (100, 100), (200, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 50, 100))  # left half: transparent blue
    if mode == "LA":
        img = img.convert("LA")
    if mode == "P":
        img = img.convert("RGB").quantize(4)
        blue = img.getpixel((0, 0))
        data = encode(img, "PNG", transparency=blue)
    else:
        data = encode(img, "PNG")
    out = pixels(prepare_image(data, 64, quality=100).jpeg)
    assert out[:, :28].min() >= 250  # white, not blue or black
    assert out[:, 36:].max(axis=(0, 1)).tolist() != [255, 255, 255]
    assert "alpha_on_white" in prepare_image(data, 64).flags


def test_first_frame_of_animations_and_multipage_files():
    frames = [Image.new("RGB", (80, 80), c) for c in ((250, 0, 0), (0, 250, 0))]
    for fmt in ("GIF", "TIFF"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        got = prepare_image(data, 64, quality=100)
        assert np.abs(pixels(got.jpeg).reshape(-1, 3).mean(0) - (250, 0, 0)).max() < 4
        assert "multi_frame" in got.flags


@pytest.mark.parametrize(("data", "kwargs", "reason"), [
    (b"", {}, "empty_file"),
    (b"plain text, not an image", {}, "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, {}, "corrupt_image"),
    (None, {"which": "truncated"}, "truncated_image"),
    (None, {"which": "corrupt"}, "corrupt_image"),
    (None, {"which": "bomb"}, "decompression_bomb"),
    (None, {"which": "small"}, "too_small"),
    (None, {"which": "max_pixels"}, "decompression_bomb"),
])
def test_rejects_carry_a_reason(data, kwargs, reason):
    options = {}
    which = kwargs.get("which")
    if which == "truncated":
        data = truncated_jpeg()
    elif which == "corrupt":
        data = corrupt_jpeg()
    elif which == "bomb":
        data = bomb_png()
    elif which == "small":
        data = encode(photo(size=(63, 100)), "PNG")
    elif which == "max_pixels":
        data, options = encode(photo(size=(120, 100)), "PNG"), {"max_pixels": 119 * 100}
    with pytest.raises(RejectError) as info:
        prepare_image(data, 64, **options)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason)


# ------------------------------------------------------------------------------ label maps

def test_things_lut_marks_exactly_the_80_things_classes():
    assert len(COCO_THING_IDS) == 80
    values = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    mask = np.asarray(things_mask(values)).ravel()
    things = {v for v in range(256) if mask[v] == 255}
    assert things == {i - 1 for i in COCO_THING_IDS}
    assert 0 in things and 89 in things  # person, toothbrush
    assert not {11, 90, 91, 255} & things  # unused id 12, unused 91, first stuff class, unlabelled
    assert set(mask.tolist()) == {0, 255}


def expected_mask(lab: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Nearest sampling at output pixel centres, then things -> 255."""
    xs = np.floor(box[0] + (np.arange(size) + 0.5) * (box[2] - box[0]) / size).astype(int)
    ys = np.floor(box[1] + (np.arange(size) + 0.5) * (box[3] - box[1]) / size).astype(int)
    sampled = lab[ys][:, xs].astype(int)
    things = np.isin(sampled + 1, COCO_THING_IDS)
    return np.where(things, 255, 0).astype(np.uint8)


# sizes whose sampling points fall at pixel quarters (scale 1.5): no ties in nearest sampling
@pytest.mark.parametrize("size", [(192, 96), (96, 192), (96, 96)])
def test_label_map_is_cropped_like_the_image(size):
    w, h = size
    lab = synthetic_label_map(w, h, seed=5)
    prepared = prepare_image(encode(photo(size=size), "PNG"), 64)
    mask = Image.open(io.BytesIO(prepare_label_map(label_png(lab), prepared)))
    assert (mask.mode, mask.size) == ("L", (64, 64))
    want = expected_mask(lab, prepared.crop_box, 64)
    assert set(np.unique(want)) == {0, 255}  # the crop holds things and stuff
    assert np.array_equal(np.asarray(mask), want)


def test_label_map_of_an_exif_rotated_image_gets_the_same_rotation():
    stored = photo(size=(192, 96))
    exif = Image.Exif()
    exif[0x0112] = 6
    prepared = prepare_image(encode(stored, "JPEG", exif=exif.tobytes()), 64)
    lab = synthetic_label_map(192, 96, seed=2)  # annotated on the stored pixels
    upright = np.rot90(lab, k=-1)  # orientation 6: rotate 90 degrees clockwise
    mask = np.asarray(Image.open(io.BytesIO(prepare_label_map(label_png(lab), prepared))))
    assert np.array_equal(mask, expected_mask(upright, prepared.crop_box, 64))
    # an upright map works as well, and gives the same mask
    again = np.asarray(Image.open(io.BytesIO(prepare_label_map(label_png(np.ascontiguousarray(upright)), prepared))))
    assert np.array_equal(again, mask)


def test_palette_label_map_uses_indices_not_colours():
    lab = synthetic_label_map(192, 96, seed=1)
    pal = Image.fromarray(lab, "L").convert("P")
    pal.putpalette([255 - (i % 256) for i in range(768)])  # colours unrelated to the indices
    prepared = prepare_image(encode(photo(size=(192, 96)), "PNG"), 64)
    mask = np.asarray(Image.open(io.BytesIO(prepare_label_map(encode(pal, "PNG"), prepared))))
    assert np.array_equal(mask, expected_mask(lab, prepared.crop_box, 64))


@pytest.mark.parametrize(("data", "reason"), [
    (label_png(synthetic_label_map(100, 100)), "label_map_size_mismatch"),
    (b"not a png", "corrupt_label_map"),
    (b"", "corrupt_label_map"),
    (encode(Image.new("RGB", (200, 150)), "PNG"), "corrupt_label_map"),
])
def test_bad_label_maps_are_rejected(data, reason):
    prepared = prepare_image(encode(photo(size=(200, 150)), "PNG"), 64)
    with pytest.raises(RejectError) as info:
        prepare_label_map(data, prepared)
    assert info.value.reason == reason
