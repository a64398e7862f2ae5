"""Shared fixtures for the whole suite (keep small)."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def memory_url():
    """A fresh ``memory://`` folder URL, removed afterwards."""
    import fsspec

    root = f"/test-{uuid.uuid4().hex[:10]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
