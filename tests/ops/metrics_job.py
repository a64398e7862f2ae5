"""Entrypoint of the Ray job that test_prometheus.py submits: one triplet stage (mask_filter) in a
Ray actor, as Ray Data runs it, on four samples of which two are rejects; then the actor is kept
alive (its metrics with it) until the job is stopped."""

from __future__ import annotations

import io
import time

import numpy as np
import ray
from PIL import Image


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def main() -> None:
    from tasks.triplets.stage_runner import StageRunner

    ray.init()
    runner = ray.remote(num_cpus=0.1)(StageRunner).remote([("mask_filter", {"min_area": 0.01, "max_area": 0.85})],
                                                          "tiny")
    photo = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    batch = {"key": np.array(["a", "b", "c", "d"], dtype=object),
             "jpg": np.array([encode(photo, "JPEG")] * 3 + [encode(np.zeros_like(photo), "JPEG")], dtype=object),
             "mask_png": np.array([encode(mask, "PNG")] * 2 + [encode(np.zeros_like(mask), "PNG")] * 2, dtype=object),
             "reject": np.array([""] * 4, dtype=object)}
    print("rejects:", list(ray.get(runner.__call__.remote(batch))["reject"]), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
