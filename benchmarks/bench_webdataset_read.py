"""Reading a WebDataset source shard by shard: located ranged reads vs streaming each tar.

Ingest cuts a source tar into shards of ``--shard-size`` samples. Streaming (the reader without the
listing's locations) reads a tar from its start for every shard that has samples in it, so the
bytes read grow with tar size x shards per tar; the located reader reads each shard's byte range
once. This times ``load`` / ``load_located`` over every shard of one tar (no image decoding), on a
local file, and prints the bytes read and the ratio.

    .venv/bin/python benchmarks/bench_webdataset_read.py                       # 4000 samples, shards of 256
    .venv/bin/python benchmarks/bench_webdataset_read.py --n 2000 --shard-size 64
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_tar(path: Path, n: int, member_bytes: int) -> None:
    payload = os.urandom(member_bytes)  # incompressible, like JPEG bytes
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("jpg", payload), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def read_all(source, shards: list[list[tuple[str, list[int]]]], located: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for shard in shards:
        refs, where = [r for r, _ in shard], [w for _, w in shard]
        items = source.load_located(refs, where) if located else source.load(refs)
        n += sum(1 for item in items if item.error is None)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="samples in the tar")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per ingest shard")
    ap.add_argument("--member-kib", type=int, default=48, help="size of each sample's image member")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (the best is kept)")
    args = ap.parse_args()

    from tasks.sources import get_source

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "src.tar"
        write_tar(path, args.n, args.member_kib << 10)
        source = get_source("webdataset", tmp)
        entries = list(source.list_entries())
        shards = [entries[i:i + args.shard_size] for i in range(0, len(entries), args.shard_size)]
        size = path.stat().st_size
        best: dict[bool, float] = {}
        for _ in range(args.repeat):
            for located in (False, True):
                seconds, n = read_all(source, shards, located)
                assert n == args.n, (n, args.n)
                best[located] = min(best.get(located, float("inf")), seconds)
        # streaming reads each shard's tar up to the shard's last sample: sum over shards of its end offset
        streamed_bytes = sum(shard[-1][1][1] for shard in shards)
        print(f"one tar of {args.n} samples ({size / 2**20:.0f} MiB), {len(shards)} shards of {args.shard_size}, "
              f"best of {args.repeat}")
        mib = streamed_bytes / 2**20
        print(f"  streaming each shard's tar from its start: {best[False]:7.3f}s, ~{mib:8.0f} MiB read")
        print(f"  located ranged reads:                      {best[True]:7.3f}s,  {size / 2**20:8.0f} MiB read")
        print(f"RATIO located / streaming speed: {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
