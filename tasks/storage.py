"""fsspec helpers: every input and output of the project is a URL.

Local paths, ``file://``, ``s3://`` (credentials from the environment, as s3fs reads them),
``memory://`` and anything else fsspec knows work the same way. Writes are atomic: an object
store PUT is all-or-nothing by itself (streams are written uncommitted and aborted on error); on
file systems we write a temporary sibling, fsync it, rename it and fsync the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

# Object stores publish an object only when its upload completes: no rename needed.
_ATOMIC_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system for ``url`` and the path inside it.

    ``S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) points s3fs at an S3-compatible server.
    """
    kwargs: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return url_to_fs(url, **kwargs)


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL (posix separators, protocol kept)."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://{posixpath.join(rest, *parts)}"
    return os.path.join(url, *parts)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path returned by ``fs`` back into a URL another process can open."""
    proto = protocol_of(fs)
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path.lstrip('/')}" if proto != "memory" else f"memory://{path}"


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    if protocol_of(fs) in ("file", "local"):
        fs.makedirs(path, exist_ok=True)


def check_writable(url: str) -> None:
    """Raise ``PermissionError`` / ``OSError`` with a clear message if ``url`` can't be written."""
    fs, path = get_fs(url)
    probe = posixpath.join(path, f".write-probe-{uuid.uuid4().hex}")
    try:
        if protocol_of(fs) in ("file", "local"):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "not writable"
        raise OSError(f"output {url!r} is not writable: {exc}") from exc


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``url`` for writing so that it appears whole or not at all.

    The file is streamed (bounded memory). On error nothing new is left at ``url`` and an object
    already there is untouched: object stores write without autocommit and abort (a multipart
    upload is aborted) unless the block ends normally; ``memory://`` (whose files are visible from
    ``open``) and file systems write a temporary sibling and rename it. On local disks the file is
    fsynced before the rename and its folder after, so a committed name never points at data a
    power loss can take back.
    """
    fs, path = get_fs(url)
    proto = protocol_of(fs)
    if proto in _ATOMIC_PROTOCOLS and proto != "memory":
        with _uncommitted(fs, path, mode) as fh:
            yield fh
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    local = proto in ("file", "local")
    try:
        if local:
            with open(tmp, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(parent or ".")
        else:
            with fs.open(tmp, mode) as fh:
                yield fh
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        raise


@contextlib.contextmanager
def _uncommitted(fs: fsspec.AbstractFileSystem, path: str, mode: str) -> Iterator[IO[Any]]:
    """An object-store file that is committed only if the block ends normally (fsspec's ``close``
    alone would publish whatever was written so far)."""
    fh = fs.open(path, mode, autocommit=False)
    try:
        yield fh
        fh.close()  # uploads the last part, publishes nothing
        fh.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            fh.discard()  # s3fs: aborts the multipart upload
        fh.closed = True  # nothing may flush or commit it later (close() on garbage collection)
        raise


def fsync_dir(path: str) -> None:
    """Persist a rename or create inside local folder ``path`` (no-op where folders can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` atomically (one PUT on object stores, temp + fsync + rename on disks)."""
    fs, path = get_fs(url)
    if protocol_of(fs) in _ATOMIC_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    with atomic_open(url, "wb") as fh:
        fh.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    return fs.cat_file(path)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted URLs of the files directly under ``url`` whose name ends with ``suffix``."""
    fs, path = get_fs(url)
    if not fs.exists(path):
        return []
    names = [p for p in fs.ls(path, detail=False) if p.endswith(suffix)]
    return sorted(unstrip(fs, p) for p in names if not posixpath.basename(p).startswith("."))
