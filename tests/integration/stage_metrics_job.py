"""Run in a fresh process by test_stage_metrics.py: a local Ray of its own with a fast metrics
report interval, one StageRunner actor (as Ray Data runs it) on a small batch, then the node's
Prometheus endpoint is scraped until the stage's metrics appear. Prints ``RESULT {json}``."""

from __future__ import annotations

import io
import json
import re
import sys
import time
import urllib.request

import numpy as np
import ray
from PIL import Image


EXPECTED = [f"ray_cnc_triplets_{name},stage=mask_filter" for name in (
    "samples_total", "batch_seconds_count", "in_flight_batches", "samples_per_second")] + [
    "ray_cnc_triplets_rejects_total,stage=mask_filter,reason=blank_image",
    "ray_cnc_triplets_rejects_total,stage=mask_filter,reason=no_salient_object"]


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def scrape(url: str) -> dict[str, float]:
    """``name{stage,reason}`` -> value for our metrics (Ray adds its own labels, dropped here)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_cnc_triplets_\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = m.group(1) + "".join(f",{k}={labels[k]}" for k in ("stage", "reason") if k in labels)
            out[key] = float(m.group(3))
    return out


def main() -> None:
    from tasks.triplets.stage_runner import StageRunner

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 500})
    runner = ray.remote(num_cpus=0.1)(StageRunner).remote([("mask_filter", {"min_area": 0.01, "max_area": 0.85})],
                                                          "tiny")
    photo = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    batch = {"key": np.array(["a", "b", "c", "d"], dtype=object),
             "jpg": np.array([encode(photo, "JPEG")] * 3 + [encode(np.zeros_like(photo), "JPEG")], dtype=object),
             "mask_png": np.array([encode(mask, "PNG")] * 2 + [encode(np.zeros_like(mask), "PNG")] * 2, dtype=object),
             "reject": np.array([""] * 4, dtype=object)}
    rejects = [str(r) for r in ray.get(runner.__call__.remote(batch))["reject"]]
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    # Each metric is exported on its own schedule: wait until every one the test reads is there.
    metrics: dict[str, float] = {}
    error = ""
    start = time.time()
    while time.time() < start + 150 and not all(k in metrics for k in EXPECTED):
        time.sleep(0.5)
        try:
            metrics = scrape(url)
        except OSError as exc:
            error = repr(exc)
    print("RESULT " + json.dumps({"rejects": rejects, "metrics": metrics, "url": url, "last_error": error,
                                  "waited_s": round(time.time() - start, 1)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
