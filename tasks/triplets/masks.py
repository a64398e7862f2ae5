"""Mask arithmetic for triplets: binarise, measure, dilate, cut out the foreground; image codecs.

Everything here works on numpy arrays (HxW uint8 masks in {0, 255}, HxWx3 uint8 images) and is
exact, so the triplet invariants (``fg == src * mask``, binary masks) hold bit for bit.
"""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image

DILATION_AT_512 = 50
"""The CnC reference dilates 512² masks with a 50x50 square structuring element."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB."""
    with PIL.Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """Encoded mask bytes -> strictly binary HxW uint8 {0, 255} (any non-zero gray level above 127 is 255)."""
    with PIL.Image.open(io.BytesIO(data)) as img:
        return binarize(np.asarray(img.convert("L")))


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless PNG (level 1 zlib: several times faster than the default, files ~10% larger)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def binarize(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    """uint8 {0, 255}: 255 where ``mask > threshold``."""
    return np.where(np.asarray(mask) > threshold, 255, 0).astype(np.uint8)


def area_fraction(mask: np.ndarray) -> float:
    """Share of the pixels that belong to the object (mask non-zero)."""
    m = np.asarray(mask)
    return float(np.count_nonzero(m)) / max(m.size, 1)


def dilation_size(height: int, width: int, at_512: int = DILATION_AT_512) -> int:
    """Side of the square structuring element for an image of this size: 50 at 512², scaled linearly
    with the shorter side, halves rounded up (e.g. 13 at 128², 6 at 64²), at least 1."""
    return max(1, int(math.floor(at_512 * min(height, width) / 512 + 0.5)))


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation of a {0, 255} mask by a ``size`` x ``size`` square.

    The window of output pixel y spans input rows ``y - (size - 1) // 2 .. y + size // 2``, likewise
    for columns: exactly ``scipy.ndimage.binary_dilation(mask, structure=np.ones((size, size)))``, which
    the reference's ``data/get_background.py`` calls (for an even size a point at 50 covers 25..74 with
    size 50). Separable: a row max then a column max, O(H W size) with numpy only.
    """
    m = binarize(mask)
    if size <= 1:
        return m
    before, after = (size - 1) // 2, size // 2
    out = m
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (before, after)
        padded = np.pad(out, pad, mode="constant")
        out = np.lib.stride_tricks.sliding_window_view(padded, size, axis=axis).max(axis=-1)
    return np.ascontiguousarray(out, dtype=np.uint8)


def foreground(src: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """I_f = I_s ⊙ M: the source where the mask is 255, zero elsewhere (exact, uint8)."""
    keep = (np.asarray(mask) > 0).astype(np.uint8)
    return np.asarray(src, np.uint8) * keep[..., None]


def paste_unmasked(generated: np.ndarray, src: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The generated image inside the mask, the source outside it (exact)."""
    return np.where(np.asarray(mask)[..., None] > 0, generated, src).astype(np.uint8)


def is_blank(image: np.ndarray, tolerance: int = 8) -> bool:
    """Whether the image is (nearly) one flat colour: an all-black or all-white frame has no object."""
    img = np.asarray(image)
    return int(img.max()) - int(img.min()) <= tolerance
