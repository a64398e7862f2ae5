"""Condition files of a job row (depth maps, exemplars, mask): read under the job's root, capped,
decoded the way ``cnc generate`` reads them (16-bit PNG depth keeps its precision)."""

from __future__ import annotations

import io
import posixpath
import warnings

import numpy as np
from PIL import Image

from tasks import storage
from tasks.generation.rows import RowError
from tasks.imaging import unit_array

MAX_CONDITION_BYTES = 64 * 1024 * 1024
MAX_CONDITION_PIXELS = 4096 * 4096
_SPATIAL = ("fg_depth", "bg_depth", "mask")


def resolve(value: str, root: str | None) -> str:
    """The URL of a condition named in a row: a path relative to ``root``, or a URL spelled with
    ``root`` as its prefix. RowError ``path_outside_root`` for anything else (``..``, other places)."""
    if root is None:
        raise RowError("no_condition_root", f"{value!r}: the job has no condition root to read files from")
    root = root.rstrip("/")
    relative = value
    if "://" in value or value.startswith("/"):
        if not value.startswith(root + "/"):
            raise RowError("path_outside_root", f"{value!r} is not under the condition root {root}")
        relative = value[len(root) + 1:]
    normal = posixpath.normpath(relative)
    if normal in (".", "..") or normal.startswith(("../", "/")):
        raise RowError("path_outside_root", f"{value!r} leaves the condition root {root}")
    return storage.join(root, normal)


def read_condition(url: str, name: str) -> np.ndarray | Image.Image:
    """Depth maps and masks as float arrays in [0, 1] ``(H, W)`` or ``(H, W, 3)``; exemplars as RGB
    PIL images. RowError ``missing_condition`` / ``corrupt_condition`` / ``condition_too_large``."""
    try:
        fs, path = storage.get_fs(url)
        size = fs.size(path)
    except FileNotFoundError:
        raise RowError("missing_condition", f"{name} {url}: no such file") from None
    except OSError as exc:
        raise RowError("missing_condition", f"{name} {url}: {type(exc).__name__}") from None
    if size is None or size > MAX_CONDITION_BYTES:
        raise RowError("condition_too_large", f"{name} {url}: over {MAX_CONDITION_BYTES} bytes")
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise RowError("missing_condition", f"{name} {url}: no such file") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_CONDITION_PIXELS:
                raise RowError("condition_too_large", f"{name} {url}: {image.width}x{image.height} pixels")
            image.load()
    except RowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt file
        raise RowError("corrupt_condition", f"{name} {url}: not a readable image ({type(exc).__name__})") from None
    if name not in _SPATIAL:
        return image.convert("RGB")
    return unit_array(image)
