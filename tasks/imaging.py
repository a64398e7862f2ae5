"""Image preparation for ingest: bytes in, a ``size`` x ``size`` RGB JPEG centre crop out.

This is the hot path of the ingest stage, so each image is decoded once and as little as possible:

* JPEGs are decoded with libjpeg's DCT scaling (PIL "draft" mode) when the target is at least two
  times smaller, so a 2048 px photo is decoded at 1/2, 1/4 or 1/8 of its size directly.
* Only the pixels that end up in the crop are resampled (``Image.resize(box=...)``): resizing the
  short side to ``size`` and centre-cropping is one bicubic resample of the crop's source box.

The geometry follows the CnC reference (torchvision ``Resize(size, BICUBIC)`` +
``CenterCrop(size)``): the long side becomes ``int(size * long / short)`` and the crop offset is
``round((resized - size) / 2)``. Transparent images are composited on **white** (as the reference's
``HWC3`` helper does). 16-bit images keep their 8 most significant bits. ICC profiles are ignored.

Every failure is a :class:`RejectError` with a short snake_case ``reason``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats we agree to decode. Anything else (EPS, PDF, ...) is "not_an_image": some PIL plugins
# shell out or are slow, and none of them is a photo source.
Image.init()
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP", "PPM") if f in Image.OPEN)

# Leading bytes of the formats above: an unreadable file that starts like one is "corrupt_image",
# anything else is "not_an_image".
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"P6", b"P5")

# The 80 COCO "things" category ids (1..90 with 10 ids unused). COCO-Stuff label maps store
# ``category id - 1`` per pixel (0 = person ... 89 = toothbrush), stuff is 91..181, 255 unlabelled.
COCO_THING_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
_THINGS_LUT = [255 if (v + 1) in COCO_THING_IDS else 0 for v in range(256)]

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class RejectError(Exception):
    """An input that cannot become a sample. ``reason`` is a short snake_case code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message or reason


@dataclass(frozen=True)
class PreparedImage:
    """A prepared crop and the geometry that made it.

    ``orig_width``/``orig_height`` are the upright size (after EXIF orientation); ``crop_box`` is
    the crop's (left, top, right, bottom) in those original pixel coordinates (fractional: the
    crop is aligned to the resized grid). ``flags`` name anything notable that was handled.
    """

    jpeg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    crop_box: tuple[float, float, float, float]
    flags: tuple[str, ...] = ()
    stored_size: tuple[int, int] = (0, 0)  # size as stored in the file, before EXIF orientation
    transpose: int | None = field(default=None)  # the Image.Transpose applied for EXIF orientation


def crop_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Resized size and the crop box in original coordinates for short side -> ``size``, centre crop."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return (new_w, new_h), box


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise RejectError("empty_file", "the file has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RejectError("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise RejectError("corrupt_image", "starts like an image but cannot be read") from exc
        raise RejectError("not_an_image", "no known image format") from exc
    except Exception as exc:  # noqa: BLE001 - a broken header is a corrupt image
        raise RejectError("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise RejectError("decompression_bomb", f"declared size {w}x{h} exceeds {max_pixels} pixels")
    if w < 1 or h < 1:
        raise RejectError("corrupt_image", f"declared size {w}x{h}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE_FOR_ORIENTATION else 1
    except Exception:  # noqa: BLE001 - unreadable EXIF means "no orientation"
        return 1


def _to_rgb(img: Image.Image, flags: list[str]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.int64)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:  # 32-bit integers: stretch the range actually used
                arr = (arr - lo) * 255 // max(hi - lo, 1)
                flags.append("32bit_rescaled")
            elif mode.startswith("I;16") or hi > 255:
                arr = arr >> 8
                flags.append("16bit")
            arr = arr.astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        # float images: [0, 1] is the usual convention, [0, 255] is kept, any other range is stretched
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            arr, flag = arr * 255.0, "float_unit_range"
        elif lo >= 0.0 and hi <= 255.0:
            flag = "float"
        else:
            arr, flag = (arr - lo) * (255.0 / max(hi - lo, 1e-12)), "float_rescaled"
        flags.append(flag)
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flags.append("alpha_on_white")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        flags.append("cmyk")
    return img.convert("RGB")


def prepare_image(data: bytes, size: int = 512, *, min_side: int = 64, max_pixels: int = 100_000_000,
                  quality: int = 95) -> PreparedImage:
    """Decode ``data``, orient it upright, convert to RGB, resize the short side to ``size``
    (bicubic), centre-crop ``size`` x ``size`` and encode a JPEG at ``quality``.

    Same bytes in, same bytes out. Raises :class:`RejectError` for anything unusable.
    """
    img = _open(data, max_pixels)
    flags: list[str] = []
    stored_w, stored_h = img.size
    orientation = _orientation(img)
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    if transpose is not None:
        flags.append(f"exif_orientation_{orientation}")
    upright_w, upright_h = (stored_h, stored_w) if orientation >= 5 else (stored_w, stored_h)
    if min(upright_w, upright_h) < min_side:
        raise RejectError("too_small", f"{upright_w}x{upright_h} is below the minimum side {min_side}")
    if getattr(img, "is_animated", False):
        flags.append("multi_frame")  # PIL opens on frame 0: we keep the first frame
    (_, _), box = crop_geometry(upright_w, upright_h, size)
    try:
        if img.format in ("JPEG", "MPO") and min(stored_w, stored_h) >= 2 * size:
            # ask libjpeg for the smallest DCT scale that keeps the short side >= size
            scale = min(stored_w, stored_h) / size
            img.draft("RGB", (max(1, int(stored_w / scale)), max(1, int(stored_h / scale))))
        img.load()
        if transpose is not None:
            img = img.transpose(transpose)
        img = _to_rgb(img, flags)
    except RejectError:
        raise
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        reason = "truncated_image" if "truncated" in text else "corrupt_image"
        raise RejectError(reason, f"{type(exc).__name__}: {text}"[:200]) from exc
    # the decoded image may be smaller than upright_* (draft mode): map the box onto it
    fx, fy = img.width / upright_w, img.height / upright_h
    src_box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if min(upright_w, upright_h) < size:
        flags.append("upscaled")
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=src_box)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return PreparedImage(
        jpeg=buf.getvalue(), width=size, height=size, orig_width=upright_w, orig_height=upright_h,
        crop_box=box, flags=tuple(flags), stored_size=(stored_w, stored_h),
        transpose=None if transpose is None else int(transpose),
    )


def unit_array(image: Image.Image) -> np.ndarray:
    """A condition image (depth map, mask) as float32 in [0, 1]: 16-bit images keep their
    precision, float images are min-max scaled, anything else goes through RGB / 255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        return (array - array.min()) / span
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def things_mask(label_map: Image.Image) -> Image.Image:
    """COCO-Stuff label map (L/P, pixel = category id - 1) -> L mask, 255 on the 80 things classes."""
    return label_map.point(_THINGS_LUT)


def prepare_label_map(data: bytes, prepared: PreparedImage) -> bytes:
    """Crop a COCO-Stuff label map with ``prepared``'s geometry (nearest) and return the binary
    things mask (0/255, L mode) as PNG bytes.

    The map must have the image's size, either as stored (then it gets the same EXIF orientation)
    or upright; anything else is ``label_map_size_mismatch``.
    """
    if not data:
        raise RejectError("corrupt_label_map", "the label map has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            lab = Image.open(io.BytesIO(data), formats=("PNG",))
    except Exception as exc:  # noqa: BLE001
        raise RejectError("corrupt_label_map", f"{type(exc).__name__}: {exc}"[:200]) from exc
    if lab.mode not in ("L", "P"):
        raise RejectError("corrupt_label_map", f"label map mode {lab.mode} (want 8-bit L or P)")
    # the declared size is checked before any pixel is decoded: a label-map bomb costs nothing
    upright = (prepared.orig_width, prepared.orig_height)
    if lab.size not in (upright, prepared.stored_size):
        raise RejectError("label_map_size_mismatch", f"label map {lab.size[0]}x{lab.size[1]} "
                                                     f"vs image {upright[0]}x{upright[1]}")
    try:
        lab.load()
    except Exception as exc:  # noqa: BLE001
        raise RejectError("corrupt_label_map", f"{type(exc).__name__}: {exc}"[:200]) from exc
    if prepared.transpose is not None and lab.size == prepared.stored_size and lab.size != upright:
        lab = lab.transpose(Image.Transpose(prepared.transpose))
    if lab.mode == "P":
        lab = Image.frombytes("L", lab.size, lab.tobytes())  # keep the raw indices, not the palette
    crop = lab.resize((prepared.width, prepared.height), Image.Resampling.NEAREST, box=prepared.crop_box)
    buf = io.BytesIO()
    things_mask(crop).save(buf, format="PNG")
    return buf.getvalue()
