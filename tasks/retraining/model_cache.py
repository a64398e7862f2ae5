"""A registered or candidate pipeline as a local folder, for the generation workers to load.

Generation loads a pipeline from a local folder. A pipeline on a remote store (a registry on S3)
is copied once into a cache named by its immutable key, so every run, and a rerun that finds its
generated shards half done, hands generation the same path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid

from tasks import storage

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,120}$")


def cache_root() -> str:
    """``CNC_MODEL_CACHE``, else ``<temp>/cnc-models``."""
    return os.environ.get("CNC_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "cnc-models")


def local_model(url: str, key: str) -> str:
    """``url`` itself when it is a local folder; else its copy under the cache (made once, atomically)."""
    fs, path = storage.get_fs(url)
    if storage.protocol_of(fs) in ("file", "local"):
        return path
    if not _KEY_RE.match(key):
        raise ValueError(f"cache key {key!r} must be letters, digits, '-' or '_'")
    target = os.path.join(cache_root(), key)
    if os.path.isfile(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    tmp = os.path.join(cache_root(), f".{key}.tmp-{uuid.uuid4().hex}")
    try:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        try:
            os.rename(tmp, target)  # atomic; another process may have finished first
        except OSError:
            if not os.path.isfile(os.path.join(target, "model_index.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
