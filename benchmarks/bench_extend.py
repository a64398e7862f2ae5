"""``ingest --extend`` vs ingesting the grown source again, on the same files and cores.

A folder of ``--n`` distinct synthetic JPEGs is ingested; ``--m`` new ones are added (a tenth of
them copies of old files under new names). Printed: the seconds of ``--extend`` on the grown folder
and of a fresh ingest of the whole grown folder (the baseline), their ratio, and the part of the
extension spent reading what the output holds (the scan of the earlier indexes). Nothing asserts
a time.

    .venv/bin/python benchmarks/bench_extend.py                    # 2000 + 100 images, 64 px, one core
    .venv/bin/python benchmarks/bench_extend.py --n 5000 --m 200 --shard-size 64
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tasks import extend as growth
from tasks.ingest import run_ingest


def write_images(folder: Path, start: int, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed + start)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        (folder / f"img-{i:07d}.jpg").write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images in the first run")
    ap.add_argument("--m", type=int, default=100, help="images added before the extension")
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/cnc-bench-extend")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "photos"
    write_images(src, 0, args.n, args.seed)
    kw = dict(size=args.size, shard_size=args.shard_size, min_side=8, executor="local")
    run_ingest("folder", str(src), str(work / "grown"), **kw)

    write_images(src, args.n, args.m - args.m // 10, args.seed)
    for j in range(args.m // 10):  # copies of old files under new names: duplicates by content
        shutil.copy(src / f"img-{j:07d}.jpg", src / f"zz-copy-{j:07d}.jpg")

    t0 = time.perf_counter()
    shards = growth.committed_count(str(work / "grown" / "shards"))
    existing = growth.scan(str(work / "grown" / "shards"), shards)
    scan_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ext = run_ingest("folder", str(src), str(work / "grown"), extend=True, **kw)
    extend_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = run_ingest("folder", str(src), str(work / "fresh"), **kw)
    full_s = time.perf_counter() - t0

    print(f"first run: {args.n} images in {shards} shards; added {args.m} ({args.m // 10} copies of old files)")
    print(f"extend:    {extend_s:7.2f} s  ({ext.shards_written} new shards, {ext.num_present} already there, "
          f"{ext.num_duplicates} duplicates)")
    print(f"  its scan of the {shards} earlier indexes, timed alone: {scan_s:.2f} s ({1000 * scan_s / max(shards, 1):.1f} ms "
          f"per shard; known content {existing.content.nbytes} bytes, {len(existing.source_ids)} source ids)")
    print(f"fresh:     {full_s:7.2f} s  ({full.num_inputs} inputs, {len(full.shard_urls)} shards)")
    print(f"ratio fresh / extend: {full_s / extend_s:.1f}x")


if __name__ == "__main__":
    main()
