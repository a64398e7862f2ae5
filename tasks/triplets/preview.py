"""A contact sheet of a few triplets (src | mask | fg | bg | depth fg | depth bg), for people."""

from __future__ import annotations

import io
import itertools

import numpy as np
from PIL import Image, ImageDraw

from tasks import storage
from tasks.shards import iter_tar_samples

COLUMNS = ("src.jpg", "mask.png", "fg.png", "bg.jpg", "depth_fg.png", "depth_bg.png")


def _tile(data: bytes | None, size: int) -> Image.Image:
    if not data:
        return Image.new("RGB", (size, size), (60, 0, 60))
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
    return img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def render_contact_sheet(shard_urls: list[str], rows: int = 4, tile: int = 128) -> Image.Image | None:
    """The first ``rows`` triplets of the shards as one image; None if there are none."""
    samples = list(itertools.islice((s for u in shard_urls for s in iter_tar_samples(u)), rows))
    if not samples:
        return None
    label_h = 16
    sheet = Image.new("RGB", (tile * len(COLUMNS), label_h + tile * len(samples)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((c * tile + 4, 2), name.rsplit(".", 1)[0], fill="black")
    for r, s in enumerate(samples):
        for c, name in enumerate(COLUMNS):
            sheet.paste(_tile(s.get(name), tile), (c * tile, label_h + r * tile))
    return sheet


def write_contact_sheet(shard_urls: list[str], url: str, rows: int = 4, tile: int = 128) -> str | None:
    """Render and write the sheet as PNG at ``url``; returns ``url`` (None if no triplets)."""
    sheet = render_contact_sheet(shard_urls, rows, tile)
    if sheet is None:
        return None
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())
    return url
