"""What counts as new data: the manifest's hash against the champion's, new shards by name."""

from __future__ import annotations

import pytest

from tasks import storage
from tasks.registry.store import manifest_hash
from tasks.retraining import candidate_id, data_state, resolve_triplets
from tasks.retraining.data_state import DataStateError


def manifest(*shards: tuple[str, int]) -> dict:
    return {"kind": "cnc-triplets", "shards": [{"tar": t, "triplets": n, "rejects": 0} for t, n in shards],
            "failed_shards": []}


def test_new_shards_make_the_data_newer(memory_url):
    old = manifest(("shards/shard-000000.tar", 4), ("shards/shard-000001.tar", 4))
    new = manifest(("shards/shard-000000.tar", 4), ("shards/shard-000001.tar", 4), ("shards/shard-000002.tar", 3))
    url = storage.join(memory_url, "build", "triplets")
    storage.write_json(storage.join(url, "manifest.json"), new)
    assert resolve_triplets(storage.join(memory_url, "build")) == url  # a build-triplets --out works too
    state = data_state(url, manifest_hash(old), old)
    assert state.newer and state.new_shards == ["shards/shard-000002.tar"] and state.shards == 3
    assert "1 of 3 shards are new" in state.reason()
    same = data_state(url, manifest_hash(new), new)
    assert not same.newer and same.new_shards == [] and "nothing new" in same.reason()
    first = data_state(url)
    assert first.newer and first.champion_hash is None and len(first.new_shards) == 3


def test_unfinished_or_missing_data_is_refused(memory_url):
    with pytest.raises(DataStateError, match="not a finished triplet output"):
        resolve_triplets(memory_url)
    storage.write_json(storage.join(memory_url, "manifest.json"),
                       {**manifest(("shards/shard-000000.tar", 4)), "failed_shards": [{"shard": 1}]})
    with pytest.raises(DataStateError, match="failed shards"):
        data_state(memory_url)


def test_a_candidate_is_named_by_champion_data_and_training():
    a = candidate_id("v20261128-170500-3fa2c1", "d" * 64, {"lr": 1e-5})
    assert a == candidate_id("v20261128-170500-3fa2c1", "d" * 64, {"lr": 1e-5})
    assert a.startswith("v20261128-170500-3fa2c1-")
    assert len({a, candidate_id(None, "d" * 64, {"lr": 1e-5}), candidate_id("v20261128-170500-3fa2c1", "e" * 64,
                                                                               {"lr": 1e-5}),
                candidate_id("v20261128-170500-3fa2c1", "d" * 64, {"lr": 1e-4})}) == 4
