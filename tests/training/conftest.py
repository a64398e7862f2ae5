"""Shared data for the training tests: one small set of synthetic triplet shards, one local Ray."""

from __future__ import annotations

import pytest

from tests.fixtures.triplets import write_triplet_shards

NUM_TRIPLETS = 8


@pytest.fixture(scope="session")
def triplets(tmp_path_factory) -> tuple[str, list[str]]:
    """(URL, keys) of 8 synthetic triplets (64 px, CLIP embeddings stored) in two shards, plus a reject."""
    url = str(tmp_path_factory.mktemp("triplets"))
    keys = write_triplet_shards(url, NUM_TRIPLETS, shard_size=4, rejects=1)
    return url, keys


@pytest.fixture(scope="session")
def ray_two_cpus(ray_local):
    """The suite's local Ray (2 CPUs, the S3 server's variables in its workers)."""
    return ray_local
