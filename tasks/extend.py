"""Growing an output: segments of shards, and what the existing shards already hold.

An output that is extended (``--extend``) is a run of *segments*: each segment is a contiguous
range of shards planned by one extension, starting where the previous one ended. The first shard
of every segment is recorded in ``_segments.json`` (written atomically under the run's lease when
a segment opens), so a crashed extension is resumed with the same plan: shards before the last
segment are kept as they are (never rewritten, never re-planned), and the last segment is planned
again from the source minus what the earlier shards hold.

What the earlier shards hold is read from their indexes, one at a time and only the small columns:
the source ids (a set of strings), the content hashes of their samples (a sorted array of 64-bit
prefixes of the SHA-256: 8 bytes per sample) and the source ids of retryable rejects that no later
shard retried. No image bytes are read.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tasks import storage
from tasks.shards import OK, read_index, read_input_hash, shard_urls

SEGMENTS_FILE = "_segments.json"
CONTENT_HASH = "content_hash"  # index column of ingest rows: hex SHA-256 of the source image bytes


def content_hash(data: bytes) -> str:
    """The hex SHA-256 of an input's bytes, as stored in the index."""
    return hashlib.sha256(data).hexdigest()


def hash_prefix(hex_digest: str) -> int:
    """The 64-bit prefix of a hex digest that the known-content array holds."""
    return int(hex_digest[:16], 16)


@dataclass
class Existing:
    """What shards ``0 .. shards-1`` of an output hold."""

    shards: int = 0
    source_ids: set[str] = field(default_factory=set)
    content: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))  # sorted prefixes
    retry: list[str] = field(default_factory=list)  # retryable rejects not retried since, in shard order

    def has_content(self, hex_digest: str) -> bool:
        return contains(self.content, hex_digest)


def contains(sorted_prefixes: np.ndarray, hex_digest: str) -> bool:
    """Whether ``hex_digest``'s prefix is in the sorted array (a false match needs a 64-bit collision)."""
    if not len(sorted_prefixes):
        return False
    value = np.uint64(hash_prefix(hex_digest))
    i = int(np.searchsorted(sorted_prefixes, value))
    return i < len(sorted_prefixes) and sorted_prefixes[i] == value


def scan(shards_url: str, shards: int) -> Existing:
    """Read the indexes of shards ``0 .. shards-1`` (every one must be committed)."""
    out = Existing(shards)
    prefixes: list[int] = []
    retry: dict[str, int] = {}  # source id -> shard of its retryable reject
    for i in range(shards):
        index_url = shard_urls(shards_url, i)[1]
        if not storage.exists(index_url):
            raise FileNotFoundError(f"shard {i} of {shards_url} is missing; an extended output keeps every "
                                    f"earlier shard (resume the run that made it, or write to a new --out)")
        table = read_index(index_url)
        cols = [c for c in ("source_id", "status", "retryable", CONTENT_HASH) if c in table.column_names]
        for r in table.select(cols).to_pylist():
            sid = r["source_id"]
            if sid in retry and retry[sid] < i:
                del retry[sid]
            out.source_ids.add(sid)
            if r["status"] == OK and r.get(CONTENT_HASH):
                prefixes.append(hash_prefix(r[CONTENT_HASH]))
            elif r["status"] != OK and r.get("retryable"):
                retry[sid] = i
    out.content = np.unique(np.asarray(prefixes, dtype=np.uint64))
    out.retry = list(retry)  # dicts keep insertion order: the order of the shards
    return out


def committed_count(shards_url: str) -> int:
    """How many shards ``0, 1, ...`` are committed, counting up to the first without an index."""
    n = 0
    while storage.exists(shard_urls(shards_url, n)[1]):
        n += 1
    return n


def segments(out_url: str) -> list[dict[str, Any]]:
    """The output's segments, oldest first (one segment starting at shard 0 when never extended)."""
    url = storage.join(out_url, SEGMENTS_FILE)
    if not storage.exists(url):
        return [{"first_shard": 0, "listing": True}]
    return list(storage.read_json(url)["segments"])


def open_segment(out_url: str, first_shard: int, listing: bool) -> list[dict[str, Any]]:
    """Start a segment at ``first_shard`` (``listing``: it takes new inputs from the source; else it
    only retries transient rejects). An empty last segment (nothing was planned in it) is replaced."""
    segs = [s for s in segments(out_url) if s["first_shard"] < first_shard]
    segs.append({"first_shard": first_shard, "listing": listing})
    storage.write_json(storage.join(out_url, SEGMENTS_FILE), {"segments": segs})
    return segs


def has_retryable_rejects(out_url: str) -> bool:
    """Whether a finished output's ``rejects.parquet`` lists a retryable reject."""
    url = storage.join(out_url, "rejects.parquet")
    if not storage.exists(url):
        return False
    table = pq.read_table(io.BytesIO(storage.read_bytes(url)))
    return "retryable" in table.column_names and any(table.column("retryable").to_pylist())


def kept_shard_hash(shards_url: str, index: int) -> str:
    """The input hash a kept (earlier segment's) shard was committed with, so the runner skips it."""
    return read_input_hash(shard_urls(shards_url, index)[1]) or ""
