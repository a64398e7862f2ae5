"""What every output manifest records about the software that made it, and how it is written:
atomically, with every URL in it redacted (no credentials in user-info or query strings)."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from tasks import storage
from tasks.redact import redact_obj

_PACKAGES = ("compose-and-conquer", "pillow", "numpy", "torch", "diffusers", "transformers", "ray", "pyarrow",
             "webdataset")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the output bytes."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def redacted(obj: Any) -> Any:
    """The form of a manifest or config that may be persisted: every URL without credentials.

    Compare a stored ``_config.json`` with ``redacted(wanted)``, not ``wanted``.
    """
    return redact_obj(obj)


def write_manifest(url: str, obj: Any) -> None:
    """Write a ``manifest.json`` / ``_config.json`` (or any record) atomically, URLs redacted."""
    storage.write_json(url, redacted(obj))
