"""What people read from an evaluation: a table (settings x metrics, beside the paper's) and a PNG
figure (bars per setting for each metric, then a row of sample images per setting)."""

from __future__ import annotations

import io
import itertools
import math
from typing import Any

from PIL import Image, ImageDraw

from tasks import storage
from tasks.evaluation.fidelity import KEYS as FIDELITY_KEYS
from tasks.evaluation.measure import sample_image
from tasks.shards import iter_tar_samples

METRICS = (("fid", "FID (lower is better)"), ("inception_score", "Inception Score"), ("clip_score", "CLIPScore"))
_COLOURS = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setting: our numbers and, where the paper has the setting, its numbers."""
    rows = []
    for name, values in metrics["settings"].items():
        paper = metrics.get("paper_table1", {}).get(name, {})
        row = {"setting": name, "images": values["images"]}
        for key, _ in METRICS:
            row[key] = _round(values[key])
            row[f"paper_{key}"] = paper.get(key, "")
        for key in FIDELITY_KEYS:
            if key in values:
                row[key] = _round(values[key])
        rows.append(row)
    return rows


def render_figure(metrics: dict[str, Any], samples: dict[str, list[bytes]], tile: int = 96) -> Image.Image:
    """Bars per setting for each metric (values printed on them), then sample images per setting."""
    names = list(metrics["settings"])
    bar_w, chart_h, pad = 52, 140, 24
    chart_w = pad + len(names) * (bar_w + 12)
    grid_cols = max((len(v) for v in samples.values()), default=0)
    width = max(len(METRICS) * chart_w + pad, 110 + grid_cols * tile, 360)
    height = 28 + chart_h + 40 + len(names) * (tile + 4) + 8
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    title = "evaluation" + (" (tiny feature nets: plumbing, not FID)" if metrics.get("plumbing") else "")
    draw.text((8, 6), title, fill="black")
    for m, (key, label) in enumerate(METRICS):
        x0, y0 = pad + m * chart_w, 28
        draw.text((x0, y0), label, fill="black")
        values = [metrics["settings"][n][key] for n in names]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        top = max([abs(v) for v in finite] + [1e-9])
        base = y0 + chart_h
        for i, (name, v) in enumerate(zip(names, values)):
            bx = x0 + i * (bar_w + 12)
            if isinstance(v, (int, float)) and math.isfinite(v):
                h = int((chart_h - 30) * abs(v) / top)
                draw.rectangle([bx, base - h, bx + bar_w, base], fill=_COLOURS[i % len(_COLOURS)])
                draw.text((bx, base - h - 12), f"{v:.3g}", fill="black")
            draw.text((bx, base + 4), name[:8], fill="black")
    y = 28 + chart_h + 40
    for name in names:
        draw.text((8, y + tile // 2 - 6), name[:14], fill="black")
        for c, data in enumerate(samples.get(name, [])):
            with Image.open(io.BytesIO(data)) as img:
                fig.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR), (110 + c * tile, y))
        y += tile + 4
    return fig


def first_images(shards_url: str, count: int) -> list[bytes]:
    """The first ``count`` images of a shard set (streamed)."""
    samples = (s for tar in storage.list_files(shards_url, ".tar") for s in iter_tar_samples(tar))
    return [d for d in itertools.islice((sample_image(s) for s in samples), count) if d]


def write_report(metrics: dict[str, Any], settings: dict[str, str], out: str, samples_per_setting: int = 4) -> str:
    """Render the figure to ``out/metrics.png``; returns its URL."""
    samples = {name: first_images(url, samples_per_setting) for name, url in settings.items()}
    buffer = io.BytesIO()
    render_figure(metrics, samples).save(buffer, format="PNG")
    url = storage.join(out, "metrics.png")
    storage.write_bytes(url, buffer.getvalue())
    return url


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else value
