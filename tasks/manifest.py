"""What every output manifest records about the software that made it."""

from __future__ import annotations

from importlib import metadata

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
