"""Pictures of a GLoD sweep: a contact sheet per spec (rows = one grid axis, columns = another)
and a plot of global vs local alignment per setting with the Pareto front marked."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from PIL import Image, ImageDraw


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both scores (higher is better), in order."""
    front = []
    for i, (gx, lx) in enumerate(points):
        if not (math.isfinite(gx) and math.isfinite(lx)):
            continue
        dominated = any(gy >= gx and ly >= lx and (gy > gx or ly > lx)
                        for j, (gy, ly) in enumerate(points) if j != i and math.isfinite(gy) and math.isfinite(ly))
        if not dominated:
            front.append(i)
    return front


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_label(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def contact_sheet(results: list[dict[str, Any]], images: dict[str, bytes], rows_axis: str, cols_axis: str,
                  tile: int = 96) -> Image.Image:
    """One spec's images on a grid: a row per value of ``rows_axis``, a column per value of
    ``cols_axis`` (the first image of a cell where other axes vary); empty cells for rejects."""
    row_values = list(dict.fromkeys(_label(r["point"][rows_axis]) for r in results))
    col_values = list(dict.fromkeys(_label(r["point"][cols_axis]) for r in results))
    cell: dict[tuple[str, str], bytes] = {}
    for r in results:
        key = (_label(r["point"][rows_axis]), _label(r["point"][cols_axis]))
        if key not in cell and r["id"] in images:
            cell[key] = images[r["id"]]
    left, top = 110, 32
    sheet = Image.new("RGB", (left + tile * len(col_values), top + tile * len(row_values)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"rows: {rows_axis}  columns: {cols_axis}", fill="black")
    for c, cv in enumerate(col_values):
        draw.text((left + c * tile + 4, top - 14), cv, fill="black")
    for r_, rv in enumerate(row_values):
        draw.text((4, top + r_ * tile + tile // 2 - 6), rv, fill="black")
        for c, cv in enumerate(col_values):
            data = cell.get((rv, cv))
            x, y = left + c * tile, top + r_ * tile
            if data is None:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=(60, 0, 60))
                continue
            with Image.open(io.BytesIO(data)) as img:
                sheet.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR), (x, y))
    return sheet


def alignment_plot(results: list[dict[str, Any]], size: int = 420) -> Image.Image:
    """Global (x) vs local (y) alignment of every image, Pareto-front points ringed and joined."""
    pts = [(r["global_score"], r["local_score"]) for r in results]
    finite = [p for p in pts if all(math.isfinite(v) for v in p)]
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    m = 40
    draw.rectangle([m, m // 2, size - m // 2, size - m], outline="black")
    draw.text((size // 2 - 40, size - m + 14), "global alignment", fill="black")
    draw.text((4, 4), "local alignment (y) vs global (x); ringed: Pareto front", fill="black")
    if not finite:
        return img
    xs, ys = [p[0] for p in finite], [p[1] for p in finite]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1e-6
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6

    def to_px(p: tuple[float, float]) -> tuple[float, float]:
        return (m + 8 + (p[0] - x0) / (x1 - x0) * (size - 1.5 * m - 16),
                size - m - 8 - (p[1] - y0) / (y1 - y0) * (size - 1.5 * m - 16))

    names = sorted({r["spec_name"] for r in results})
    colours = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]
    for r, p in zip(results, pts):
        if all(math.isfinite(v) for v in p):
            x, y = to_px(p)
            colour = colours[names.index(r["spec_name"]) % len(colours)]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    front = sorted((pts[i] for i in pareto_front(pts)), key=lambda p: p[0])
    for p in front:
        x, y = to_px(p)
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline="black", width=2)
    if len(front) > 1:
        draw.line([to_px(p) for p in front], fill="black", width=1)
    for i, name in enumerate(names):
        draw.text((m + 8, m // 2 + 4 + 12 * i), name, fill=colours[i % len(colours)])
    draw.text((m, size - m + 2), f"{x0:.3f}", fill="black")
    draw.text((size - m - 20, size - m + 2), f"{x1:.3f}", fill="black")
    return img
