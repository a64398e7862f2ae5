"""Writing WebDataset shards that appear whole or not at all, with a parquet index beside each.

A shard is ``shard-NNNNNN.tar`` plus ``shard-NNNNNN.parquet``. The tar is streamed to storage
(bounded memory) and published atomically; the index is written last and is the commit marker:
a shard counts as done exactly when its index exists. Tar members carry fixed metadata (mtime 0,
uid/gid 0, no user names) and samples keep their planned order, so the same inputs and config give
byte-identical shards.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_id", pa.string()),
        ("status", pa.string()),  # "ok", "rejected" or "duplicate" (its bytes are already in the output)
        ("reason", pa.string()),  # "" for ok rows
        ("caption", pa.string()),
        ("bytes", pa.int64()),  # total bytes of the sample's files in the tar
        ("detail", pa.string()),  # a reject's detail (the exception's type and message); "" for ok rows
        ("retryable", pa.bool_()),  # a reject a later run may turn into a sample (a transient cause)
    ]
)
OK, REJECTED, DUPLICATE = "ok", "rejected", "duplicate"
INPUT_HASH_KEY = b"cnc.input_hash"  # index metadata: the hash of the inputs the shard was planned from


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def shard_urls(shards_url: str, index: int) -> tuple[str, str]:
    """(tar URL, index URL) of shard ``index`` under ``shards_url``."""
    name = shard_name(index)
    return storage.join(shards_url, f"{name}.tar"), storage.join(shards_url, f"{name}.parquet")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Streams samples into one tar and records every input (sample or reject) in its index.

    Use as a context manager; :meth:`commit` publishes the tar, then the index. Leaving the
    block without committing (an exception) publishes nothing.
    """

    def __init__(self, tar_url: str, index_url: str, extra_columns: Mapping[str, pa.DataType] | None = None,
                 input_hash: str | None = None):
        self.tar_url = tar_url
        self.index_url = index_url
        self._extra = dict(extra_columns or {})
        self._input_hash = input_hash
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._stack = ExitStack()
        self._tar: tarfile.TarFile | None = None
        self._committed = False

    def __enter__(self) -> ShardWriter:
        fh = self._stack.enter_context(storage.atomic_open(self.tar_url, "wb"))
        self._tar = tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self._tar is not None:
            # Abandon the stream without flushing a tar footer into a file about to be discarded.
            self._tar.closed = True
            self._tar.fileobj.closed = True  # type: ignore[union-attr]
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # the atomic writer discards the temp file
        elif not self._committed:
            abandoned = RuntimeError("shard left without commit")
            self._stack.__exit__(RuntimeError, abandoned, None)

    @property
    def counts(self) -> dict[str, int]:
        ok = sum(1 for r in self._rows if r["status"] == OK)
        dup = sum(1 for r in self._rows if r["status"] == DUPLICATE)
        return {"samples": ok, "rejects": len(self._rows) - ok - dup, "duplicates": dup}

    def add_sample(self, key: str, source_id: str, files: Mapping[str, bytes], caption: str | None = None,
                   **extra: Any) -> None:
        """Add one sample: ``files`` maps extensions (``"jpg"``, ``"mask.png"``) to bytes."""
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in {self.tar_url}")
        if "." in key or "/" in key:
            raise ValueError(f"key {key!r} must not contain '.' or '/'")
        assert self._tar is not None, "use ShardWriter as a context manager"
        total = 0
        for ext in sorted(files):
            data = files[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
            total += len(data)
        self._keys.add(key)
        self._rows.append({"key": key, "source_id": source_id, "status": OK, "reason": "",
                           "caption": caption or "", "bytes": total, "detail": "", "retryable": False, **extra})

    def add_reject(self, source_id: str, reason: str, key: str = "", *, detail: str = "", retryable: bool = False,
                   **extra: Any) -> None:
        """Record an input that is not a sample: ``reason`` is a short code, ``detail`` says more."""
        self._rows.append({"key": key, "source_id": source_id, "status": REJECTED, "reason": reason,
                           "caption": "", "bytes": 0, "detail": detail[:500], "retryable": bool(retryable),
                           **extra})

    def add_duplicate(self, source_id: str, reason: str, key: str = "", *, detail: str = "", **extra: Any) -> None:
        """Record an input that is already in the output under another name (the same bytes):
        neither a sample nor a reject, counted as a duplicate."""
        self._rows.append({"key": key, "source_id": source_id, "status": DUPLICATE, "reason": reason,
                           "caption": "", "bytes": 0, "detail": detail[:500], "retryable": False, **extra})

    def commit(self) -> dict[str, int]:
        """Publish the tar, then the index (the commit marker). Returns the shard's counts."""
        assert self._tar is not None
        self._tar.close()
        self._stack.close()  # closes the stream and renames the temp tar into place
        self._committed = True
        write_index(self.index_url, self._rows, self._extra, self._input_hash)
        return self.counts


def write_index(url: str, rows: Iterable[Mapping[str, Any]], extra_columns: Mapping[str, pa.DataType] | None = None,
                input_hash: str | None = None) -> None:
    schema = INDEX_SCHEMA
    for name, dtype in (extra_columns or {}).items():
        schema = schema.append(pa.field(name, dtype))
    if input_hash is not None:
        schema = schema.with_metadata({INPUT_HASH_KEY: input_hash.encode()})
    rows = list(rows)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(url, buf.getvalue())


def read_index(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url)))


def read_input_hash(index_url: str) -> str | None:
    """The input hash a shard's index was committed with (None for indexes written before it existed)."""
    fs, path = storage.get_fs(index_url)
    with fs.open(path, "rb") as fh:
        meta = pq.read_schema(fh).metadata or {}
    value = meta.get(INPUT_HASH_KEY)
    return value.decode() if value is not None else None


def iter_tar_samples(tar_url: str) -> Iterable[dict[str, Any]]:
    """Stream a WebDataset tar as ``{"__key__": key, ext: bytes, ...}`` dicts, in order."""
    fs, path = storage.get_fs(tar_url)
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current
