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


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on a 2-core machine: one torch thread avoids OpenMP spin-waiting against Ray
    workers and the other process, and keeps float results independent of the core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
