"""What a finished stage leaves beside its model: ``train_report.json`` and ``loss_curve.png``."""

from __future__ import annotations

import io
import math
import time
from typing import Any

from PIL import Image, ImageDraw

from tasks import storage
from tasks.manifest import versions


def loss_curve_png(history: list[dict[str, Any]], title: str, size: tuple[int, int] = (640, 360)) -> bytes:
    """Training loss per logged step (blue) and validation loss (orange dots), as PNG bytes."""
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, w - 16, 28, h - 36
    draw.text((left, 8), title, fill="black")
    points = [(r["step"], r["loss"]) for r in history if math.isfinite(r.get("loss", math.nan))]
    vals = [(r["step"], r["val_loss"]) for r in history if math.isfinite(r.get("val_loss", math.nan))]
    draw.rectangle((left, top, right, bottom), outline="black")
    if points:
        ys = [y for _, y in points + vals]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-6
        x0, x1 = points[0][0], max(points[-1][0], points[0][0] + 1)

        def at(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

        if len(points) > 1:
            draw.line([at(x, y) for x, y in points], fill=(31, 119, 180), width=2)
        else:
            px, py = at(*points[0])
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(31, 119, 180))
        for x, y in vals:
            px, py = at(x, y)
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(255, 127, 14))
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {x1}", fill="black")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_report(out_url: str, config: dict[str, Any], state: Any, manifest_hash: str, data: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    """``train_report.json`` (written last: the stage's commit marker) and ``loss_curve.png``."""
    history = state.history
    storage.write_bytes(storage.join(out_url, "loss_curve.png"),
                        loss_curve_png(history, f"CnC {config['stage']} stage: training loss"))
    last_val = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
    report = {
        "kind": "cnc-train-report",
        "stage": config["stage"],
        "identity": state.identity,
        "config": config,
        "data": {**data, "manifest_hash": manifest_hash},
        "steps": state.step,
        "epochs_completed": state.epoch,
        "samples": state.samples,
        "final_loss": history[-1]["loss"] if history else None,
        "final_val_loss": last_val,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "history": history,
    }
    storage.write_json(storage.join(out_url, "train_report.json"), report)
    return report
