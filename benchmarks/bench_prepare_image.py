"""prepare_image throughput (one core) against a naive PIL baseline, on the same JPEGs, in one run.

The corpus: --n JPEGs cut from scikit-image's photos, long side 640-2048 px, mixed aspect ratios
and qualities, built in memory. The baseline is what a straightforward pipeline does: full decode,
convert, resize the whole image (bicubic), centre crop, encode (same size and quality). Both are
timed interleaved, several rounds, best round kept.

Run:  .venv/bin/python benchmarks/bench_prepare_image.py [--n 120] [--size 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.imaging import crop_geometry, prepare_image  # noqa: E402
from tasks.sample_images import SAMPLE_PHOTOS, sample_photo_bytes  # noqa: E402


def corpus(n: int, seed: int = 0) -> list[bytes]:
    photos = [Image.open(io.BytesIO(sample_photo_bytes(p))).convert("RGB") for p in sorted(SAMPLE_PHOTOS)]
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img = photos[i % len(photos)]
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3]))
        long_side = int(rng.integers(640, 2049))
        size = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=int(rng.choice([75, 85, 95])))
        out.append(buf.getvalue())
    return out


def naive(data: bytes, size: int, quality: int = 95) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    (nw, nh), _ = crop_geometry(img.width, img.height, size)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    files = corpus(args.n)
    mp = sum(Image.open(io.BytesIO(d)).width * Image.open(io.BytesIO(d)).height for d in files) / 1e6
    print(f"{len(files)} JPEGs, {mp / len(files):.2f} MP on average, target {args.size}px")
    best = {"ours": float("inf"), "naive": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("ours", lambda d: prepare_image(d, args.size).jpeg),
                         ("naive", lambda d: naive(d, args.size))):
            t0 = time.perf_counter()
            for d in files:
                fn(d)
            best[name] = min(best[name], time.perf_counter() - t0)
    ours, base = len(files) / best["ours"], len(files) / best["naive"]
    print(f"prepare_image : {ours:7.1f} images/s/core")
    print(f"naive PIL     : {base:7.1f} images/s/core")
    print(f"ratio         : {ours / base:.2f}x")


if __name__ == "__main__":
    main()
