"""Create-if-absent writes: the one primitive the registry's concurrency rests on.

Two writers racing for one name: exactly one creates it, the other gets ``FileExistsError``.
Local files use ``os.link`` of a finished temporary file (atomic, refuses an existing target);
``memory://`` opens with ``xb``; S3 sends ``If-None-Match: *`` (AWS S3 and recent S3-compatible
servers). Other file systems fall back to fsspec's check-then-write, which is not atomic.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid

from tasks import storage


def create_exclusive(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` only if nothing is there; raise ``FileExistsError`` otherwise.

    The object appears whole or not at all.
    """
    fs, path = storage.get_fs(url)
    proto = storage.protocol_of(fs)
    if proto in ("file", "local"):
        _create_local(path, data)
    elif proto == "memory":
        with fs.open(path, "xb") as fh:
            fh.write(data)
    else:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed precondition is how S3 says "exists"
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                raise FileExistsError(url) from exc
            raise


def _create_local(path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    os.makedirs(parent or ".", exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # atomic; FileExistsError if another writer got there first
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
