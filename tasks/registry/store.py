"""A model registry that is nothing but files under one fsspec URL (a folder, ``s3://...``).

Layout under the registry's root::

    versions/<version>/pipeline/...          the pipeline folder, copied (save_pretrained layout)
    versions/<version>/train_report.json     what the training run reported
    versions/<version>/metrics.json          what evaluation measured
    versions/<version>/data_manifest.json    the manifest of the data the model was trained on
    versions/<version>/version.json          the record; written last, so it marks a whole version
    history/<seq>.json                       one event per promote or rollback, seq 1, 2, 3, ...
    champion.json                            the pointer: the current champion and its event's seq

A version is immutable: its id is new (time + random) and its record is created only if absent.
Moving the champion is one create-if-absent write of the next history event (the commit point:
two concurrent promotes get different seqs, the later one wins, neither is lost), then an atomic
rewrite of ``champion.json``. A reader trusts the pointer unless a later event exists (a writer
died between the two writes, or two writers raced): then the latest event wins. A crash at any
step before the event leaves the old champion in place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks import storage
from tasks.redact import redact_obj, redact_url
from tasks.registry.exclusive import create_exclusive

_VERSION_RE = re.compile(r"^v\d{8}-\d{6}-[0-9a-f]{6}$")
_SEQ_WIDTH = 8
_MAX_JSON_BYTES = 16 << 20  # a report or manifest larger than this is not a report
_COPY_CHUNK = 8 << 20
REPORT_FILES = ("train_report", "metrics", "data_manifest")


class RegistryError(ValueError):
    """A request the registry refuses (unknown or incomplete version, bad input); one line."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model: where its pipeline lies and what it was trained on and scored."""

    version: str
    created_at: str
    url: str                      # versions/<version>/ under the registry
    data_manifest_hash: str       # sha256 of the data manifest's canonical JSON
    metrics: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # pipeline/<rel> -> size, sha256
    source: str = ""              # where the pipeline folder was registered from (redacted)
    note: str = ""

    @property
    def pipeline_url(self) -> str:
        """The folder to hand to ``CnCPipeline.from_pretrained``."""
        return storage.join(self.url, "pipeline")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """One move of the champion pointer."""

    seq: int
    action: str                   # "promote" or "rollback"
    version: str
    previous: str | None
    reason: str
    at: str


class Registry:
    """Versions and the champion pointer under ``url``. Safe for concurrent writers."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if url.endswith("/") and len(url) > 1 else url

    # ---- versions -------------------------------------------------------------------------
    def register(self, folder: str, reports: Mapping[str, Any], note: str = "") -> ModelVersion:
        """Copy a saved pipeline folder and its reports in as a new, immutable version.

        ``reports`` holds ``train_report``, ``metrics`` and ``data_manifest``, each a dict or
        the URL of a JSON file. The new version is not the champion until promoted.
        """
        loaded = _load_reports(reports)
        src_fs, src_root = storage.get_fs(folder)
        if not src_fs.isfile(posixpath.join(src_root, "model_index.json")):
            raise RegistryError(f"{redact_url(folder)} is not a saved pipeline (no model_index.json)")
        version = _new_version_id()
        vurl = self._version_url(version)
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(src_fs.find(src_root)):
            rel = posixpath.relpath(path, src_root)
            if rel.startswith("..") or any(part.startswith(".") for part in rel.split("/")):
                continue  # temporaries and hidden files are not part of a pipeline
            files[f"pipeline/{rel}"] = _copy(src_fs, path, storage.join(vurl, "pipeline", rel))
        for name in REPORT_FILES:
            storage.write_json(storage.join(vurl, f"{name}.json"), redact_obj(loaded[name]))
        record = ModelVersion(version=version, created_at=_now(), url=vurl,
                              data_manifest_hash=manifest_hash(loaded["data_manifest"]),
                              metrics=redact_obj(loaded["metrics"]), files=files,
                              source=redact_url(folder), note=note)
        # the record is the commit marker: a version without it is invisible and never promotable
        create_exclusive(storage.join(vurl, "version.json"), _dumps(record.to_json()))
        return record

    def versions(self) -> list[ModelVersion]:
        """Every complete version, oldest first."""
        self._fresh()
        fs, root = storage.get_fs(storage.join(self.url, "versions"))
        if not fs.exists(root):
            return []
        out = []
        for path in fs.ls(root, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if _VERSION_RE.match(name) and fs.exists(posixpath.join(path, "version.json")):
                out.append(self.get(name))
        return sorted(out, key=lambda v: (v.created_at, v.version))

    def get(self, version: str) -> ModelVersion:
        """The record of ``version``; ``RegistryError`` if it is unknown or was never finished."""
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise RegistryError(f"{version!r} is not a version id (like v20261128-170500-3fa2c1)")
        url = storage.join(self._version_url(version), "version.json")
        if not storage.exists(url):
            raise RegistryError(f"no complete version {version} in {redact_url(self.url)}")
        return ModelVersion(**_read_json(url))

    def report(self, version: str, name: str) -> dict[str, Any]:
        """One of a version's stored reports (``train_report``, ``metrics``, ``data_manifest``)."""
        if name not in REPORT_FILES:
            raise RegistryError(f"unknown report {name!r}; choose one of {', '.join(REPORT_FILES)}")
        return _read_json(storage.join(self.get(version).url, f"{name}.json"))

    # ---- the champion -----------------------------------------------------------------------
    def champion(self) -> ModelVersion | None:
        """The current champion, or None before the first promote."""
        event = self._latest_event()
        return self.get(event.version) if event else None

    def promote(self, version: str, reason: str) -> Event:
        """Make ``version`` the champion; the reason goes into the history."""
        self.get(version)  # refuses unknown and unfinished versions before anything is written

        def target(current: Event | None) -> str:
            if current is not None and current.version == version:
                raise RegistryError(f"{version} is already the champion")
            return version

        return self._move("promote", target, reason)

    def rollback(self, reason: str, to: str | None = None) -> Event:
        """Go back to ``to``, or to the champion that the current one replaced."""
        if to is not None:
            self.get(to)

        def target(current: Event | None) -> str:
            if to is not None:
                return to
            if current is None:
                raise RegistryError("nothing to roll back: no champion yet")
            previous = self._replaced_by(current.version)
            if previous is None:
                raise RegistryError(f"nothing to roll back to: {current.version} replaced no champion")
            return previous

        return self._move("rollback", target, reason)

    def history(self) -> list[Event]:
        """Every move of the pointer, in order."""
        self._fresh()
        fs, root = storage.get_fs(storage.join(self.url, "history"))
        if not fs.exists(root):
            return []
        names = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False))
        return [Event(**_read_json(storage.join(self.url, "history", n)))
                for n in names if re.fullmatch(r"\d+\.json", n)]

    # ---- internals --------------------------------------------------------------------------
    def _version_url(self, version: str) -> str:
        return storage.join(self.url, "versions", version)

    def _event_url(self, seq: int) -> str:
        return storage.join(self.url, "history", f"{seq:0{_SEQ_WIDTH}d}.json")

    def _pointer_url(self) -> str:
        return storage.join(self.url, "champion.json")

    def _fresh(self) -> None:
        """Forget cached listings (s3fs caches them): other writers change the registry under us."""
        fs, root = storage.get_fs(self.url)
        fs.invalidate_cache(root)

    def _latest_event(self) -> Event | None:
        """The pointer's event, or a later one if the pointer is behind (then it is repaired)."""
        self._fresh()
        pointer_url = self._pointer_url()
        seq = int(_read_json(pointer_url)["seq"]) if storage.exists(pointer_url) else 0
        if seq == 0 and not storage.exists(self._event_url(1)):
            return None
        behind = False
        while storage.exists(self._event_url(seq + 1)):
            seq, behind = seq + 1, True
        event = Event(**_read_json(self._event_url(seq)))
        if behind:
            self._write_pointer(event)
        return event

    def _replaced_by(self, version: str) -> str | None:
        """The champion before the latest promote of ``version`` (rollbacks walk back a stack)."""
        for event in reversed(self.history()):
            if event.version == version and event.action == "promote":
                return event.previous
        return None

    def _move(self, action: str, target, reason: str, attempts: int = 200) -> Event:
        if not reason or not reason.strip():
            raise RegistryError(f"{action} needs a reason")
        for _ in range(attempts):
            current = self._latest_event()
            version = target(current)
            event = Event(seq=(current.seq if current else 0) + 1, action=action, version=version,
                          previous=current.version if current else None, reason=reason, at=_now())
            try:
                create_exclusive(self._event_url(event.seq), _dumps(asdict(event)))
            except FileExistsError:
                continue  # another writer took this seq: read the new head and try the next one
            self._write_pointer(event)
            return event
        raise RegistryError(f"could not {action} {version}: {attempts} concurrent writers won first")

    def _write_pointer(self, event: Event) -> None:
        storage.write_json(self._pointer_url(), {"version": event.version, "seq": event.seq, "at": event.at})


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON: the same data set hashes the same however written."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def _load_reports(reports: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    missing = [name for name in REPORT_FILES if name not in reports]
    if missing:
        raise RegistryError(f"reports lack {', '.join(missing)} (need {', '.join(REPORT_FILES)})")
    out = {}
    for name in REPORT_FILES:
        value = reports[name]
        if isinstance(value, str):
            value = _read_json(value)
        if not isinstance(value, Mapping):
            raise RegistryError(f"{name} must be a JSON object, got {type(value).__name__}")
        out[name] = dict(value)
    return out


def _read_json(url: str) -> Any:
    fs, path = storage.get_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError as exc:
        raise RegistryError(f"{redact_url(url)} does not exist") from exc
    if size is not None and size > _MAX_JSON_BYTES:
        raise RegistryError(f"{redact_url(url)} is {size} bytes; a report is at most {_MAX_JSON_BYTES}")
    try:
        return json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise RegistryError(f"{redact_url(url)} is not JSON: {exc}") from exc


def _copy(src_fs, src_path: str, dst_url: str) -> dict[str, Any]:
    """Stream one file across file systems; returns its size and sha256."""
    digest, size = hashlib.sha256(), 0
    with src_fs.open(src_path, "rb") as src, storage.atomic_open(dst_url, "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _new_version_id() -> str:
    return f"v{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
