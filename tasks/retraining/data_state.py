"""Is the triplet data newer than what the champion was trained on?

The registry keeps, with every version, the manifest of its training data and that manifest's
hash (``tasks.registry.store.manifest_hash``: sha256 of the canonical JSON). The data is *newer*
when the current triplet manifest hashes differently from the champion's. The shards the champion
never saw (by name and triplet count: ``build-triplets --extend`` appends shards and never rewrites
one) are listed beside the verdict, so an operator sees what changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks import storage
from tasks.registry.store import manifest_hash

_MAX_MANIFEST_BYTES = 16 << 20


class DataStateError(ValueError):
    """The data URL is not a finished triplet output (one line)."""


@dataclass(frozen=True)
class DataState:
    """The current triplet data against the champion's."""

    url: str                       # the triplet folder (manifest.json + shards/)
    manifest: dict[str, Any]
    hash: str
    champion_hash: str | None
    new_shards: list[str] = field(default_factory=list)
    shards: int = 0

    @property
    def newer(self) -> bool:
        """True without a champion, or when the manifest differs from the champion's."""
        return self.champion_hash is None or self.hash != self.champion_hash

    def reason(self) -> str:
        if self.champion_hash is None:
            return f"no champion yet: {self.shards} shards, data {self.hash[:12]}"
        if not self.newer:
            return f"data {self.hash[:12]} is what the champion was trained on: nothing new"
        return (f"data {self.hash[:12]} differs from the champion's {self.champion_hash[:12]}: "
                f"{len(self.new_shards)} of {self.shards} shards are new")


def resolve_triplets(url: str) -> str:
    """The triplet folder of ``url``: itself when it holds ``manifest.json``, or its ``triplets/``
    (a build-triplets ``--out``, as the ``cnc.triplets.committed`` event names it)."""
    url = url.rstrip("/") if len(url) > 1 else url
    if storage.exists(storage.join(url, "manifest.json")):
        return url
    nested = storage.join(url, "triplets")
    if storage.exists(storage.join(nested, "manifest.json")):
        return nested
    raise DataStateError(f"{url} is not a finished triplet output (no manifest.json, nor triplets/manifest.json)")


def read_manifest(triplets_url: str) -> dict[str, Any]:
    """The triplet manifest, refused when too large, malformed, or listing failed shards."""
    url = storage.join(triplets_url, "manifest.json")
    fs, path = storage.get_fs(url)
    size = fs.size(path)
    if size is not None and size > _MAX_MANIFEST_BYTES:
        raise DataStateError(f"{url}: manifest of {size} bytes exceeds {_MAX_MANIFEST_BYTES}")
    manifest = storage.read_json(url)
    if not isinstance(manifest, dict):
        raise DataStateError(f"{url} is not a JSON object")
    if manifest.get("failed_shards"):
        raise DataStateError(f"{triplets_url} has failed shards: finish it with --resume before retraining")
    return manifest


def _shard_set(manifest: Mapping[str, Any]) -> set[tuple[str, Any]]:
    return {(s.get("tar"), s.get("triplets")) for s in manifest.get("shards", []) if isinstance(s, Mapping)}


def data_state(triplets_url: str, champion_hash: str | None = None,
               champion_manifest: Mapping[str, Any] | None = None) -> DataState:
    """Compare the manifest under ``triplets_url`` with the champion's: its recorded hash decides
    (None: no champion), its stored manifest names the shards it saw."""
    manifest = read_manifest(triplets_url)
    current = _shard_set(manifest)
    seen = _shard_set(champion_manifest) if champion_manifest is not None else set()
    new = sorted(str(tar) for tar, _ in current - seen)
    shards = len(current) or len(storage.list_files(storage.join(triplets_url, "shards"), ".tar"))
    return DataState(url=triplets_url, manifest=manifest, hash=manifest_hash(manifest),
                     champion_hash=champion_hash,
                     new_shards=new, shards=shards)
