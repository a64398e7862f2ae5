"""Two-phase writing of triplet shards: stage small parts as batches finish, then assemble.

Model stages finish samples in batches that mix shards and arrive in any order. Each finished
batch is written at once as small *part* shards under ``_staging/shard-NNNNNN/`` (one part per
shard present in the batch, published atomically), so a crash loses at most the batches in flight
and the expensive inpainting is never redone for staged samples. When every sample of a shard is
staged, :func:`assemble_shard` writes the final shard in the ingest shard's order (so the bytes do
not depend on batching or scheduling) and removes the parts.
"""

from __future__ import annotations

import tarfile
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from tasks import storage
from tasks.shards import DUPLICATE, OK, ShardWriter, read_index, shard_name, shard_urls


def staging_url(out_url: str, shard: int) -> str:
    return storage.join(out_url, "_staging", shard_name(shard))


def write_part(out_url: str, shard: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """Stage finished rows of one shard. Each row: key, source_id, caption, files (ext -> bytes),
    reject ("" if ok). Returns the number of rows staged."""
    part = f"part-{uuid.uuid4().hex}"
    root = staging_url(out_url, shard)
    n = 0
    with ShardWriter(storage.join(root, f"{part}.tar"), storage.join(root, f"{part}.parquet")) as w:
        for r in rows:
            if r["reject"]:
                w.add_reject(r["source_id"], r["reject"], r["key"])
            else:
                w.add_sample(r["key"], r["source_id"], r["files"], r["caption"])
            n += 1
        w.commit()
    return n


def staged_rows(out_url: str, shard: int) -> dict[str, dict[str, Any]]:
    """key -> index row (plus ``part`` URL) of every committed part of ``shard``."""
    rows: dict[str, dict[str, Any]] = {}
    for index_url in storage.list_files(staging_url(out_url, shard), ".parquet"):
        tar_url = index_url[: -len(".parquet")] + ".tar"
        for r in read_index(index_url).to_pylist():
            rows.setdefault(r["key"], {**r, "part": tar_url})  # a retried batch may stage a key twice
    return rows


def _member_offsets(tar_url: str) -> dict[str, tuple[int, int]]:
    fs, path = storage.get_fs(tar_url)
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def assemble_shard(out_url: str, shard: int, expected: list[dict[str, Any]], input_hash: str | None = None
                   ) -> dict[str, int]:
    """Write final shard ``shard`` from its parts, in the order of ``expected`` (the ingest index
    rows: key, source_id, status, reason). Ingest rejects stay rejects (reason ``ingest:...``, retryable
    as in the ingest) and ingest duplicates stay duplicates.
    Reads one sample at a time by tar offset, so memory stays bounded."""
    staged = staged_rows(out_url, shard)
    missing = [e["key"] for e in expected if e["status"] == "ok" and e["key"] not in staged]
    if missing:
        raise RuntimeError(f"shard {shard}: {len(missing)} samples not staged yet (e.g. {missing[0]})")
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    tar_url, index_url = shard_urls(storage.join(out_url, "shards"), shard)
    with ShardWriter(tar_url, index_url, input_hash=input_hash) as w:
        for e in expected:
            if e["status"] == DUPLICATE:
                w.add_duplicate(e["source_id"], f"ingest:{e['reason']}", e["key"])
                continue
            if e["status"] != OK:
                w.add_reject(e["source_id"], f"ingest:{e['reason']}", e["key"], retryable=bool(e.get("retryable")))
                continue
            row = staged[e["key"]]
            if row["status"] != "ok":
                w.add_reject(row["source_id"], row["reason"], row["key"])
                continue
            part = row["part"]
            if part not in offsets:
                offsets[part] = _member_offsets(part)
            fs, path = storage.get_fs(part)
            files = {}
            prefix = f"{row['key']}."
            for name, (start, size) in offsets[part].items():
                if name.startswith(prefix):
                    files[name[len(prefix):]] = fs.cat_file(path, start=start, end=start + size)
            w.add_sample(row["key"], row["source_id"], files, row["caption"])
        counts = w.commit()
    fs, root = storage.get_fs(staging_url(out_url, shard))
    if fs.exists(root):
        fs.rm(root, recursive=True)
    return counts
