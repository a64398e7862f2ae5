"""Statistics to bytes and back: a .npz of plain arrays, never a pickle."""

from __future__ import annotations

import io

import numpy as np


def dump(arrays: dict[str, np.ndarray]) -> bytes:
    """``{name: array}`` -> .npz bytes (names may hold "/" to group several statistics)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def load(data: bytes) -> dict[str, np.ndarray]:
    """.npz bytes -> ``{name: array}``; object arrays are refused (``allow_pickle=False``)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def prefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state`` with every name under ``prefix/``."""
    return {f"{prefix}/{k}": v for k, v in state.items()}


def under(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays named ``prefix/...``, without the prefix."""
    start = prefix + "/"
    return {k[len(start):]: v for k, v in arrays.items() if k.startswith(start)}
