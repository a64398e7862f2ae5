"""The job table of a batch generation: parquet or JSONL at any fsspec URL -> raw row dicts.

Every line or record is accounted for: a JSONL line that is not a JSON object comes back with an
error instead of a row, so it becomes a reject like any other bad row.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

from tasks import storage

MAX_TABLE_BYTES = 1024 * 1024 * 1024
MAX_ROWS = 5_000_000


class TableError(ValueError):
    """The table cannot be read at all (missing, unknown format, too large)."""


def read_rows(url: str) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
    """``(source_id, raw row or None, error)`` for every record, in order; ``source_id`` is the
    row's id when it has one, else ``line-N`` / ``row-N``."""
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise TableError(f"job table {url} does not exist")
    size = fs.size(path) or 0
    if size > MAX_TABLE_BYTES:
        raise TableError(f"job table {url} is {size} bytes, over {MAX_TABLE_BYTES}: split it")
    lower = url.lower()
    count = 0
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            table = pq.ParquetFile(fh)
            for batch in table.iter_batches(batch_size=4096):
                for raw in batch.to_pylist():
                    count += 1
                    _check_count(count, url)
                    yield _source_id(raw, f"row-{count}"), raw, ""
    elif lower.endswith((".jsonl", ".json", ".ndjson")):
        with fs.open(path, "rb") as fh:
            for n, line in enumerate(io.TextIOWrapper(fh, encoding="utf-8", errors="replace"), start=1):
                if not line.strip():
                    continue
                count += 1
                _check_count(count, url)
                try:
                    raw = json.loads(line)
                except ValueError as exc:
                    yield f"line-{n}", None, f"not JSON: {exc.msg}"
                    continue
                if not isinstance(raw, dict):
                    yield f"line-{n}", None, f"not a JSON object but {type(raw).__name__}"
                    continue
                yield _source_id(raw, f"line-{n}"), raw, ""
    else:
        raise TableError(f"job table {url}: use a .parquet or .jsonl file")


def _source_id(raw: dict[str, Any], fallback: str) -> str:
    value = raw.get("id")
    return str(value)[:128] if value not in (None, "") else fallback


def _check_count(count: int, url: str) -> None:
    if count > MAX_ROWS:
        raise TableError(f"job table {url} has more than {MAX_ROWS} rows: split it")
