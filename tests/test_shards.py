"""The shard writer: atomic publication, fixed tar metadata, index as the commit marker."""

from __future__ import annotations

import tarfile

import pytest

from tasks import storage
from tasks.shards import ShardWriter, iter_tar_samples, read_index, shard_urls


def write_one(root: str, payload: bytes = b"x") -> tuple[str, str]:
    tar_url, index_url = shard_urls(root, 0)
    with ShardWriter(tar_url, index_url) as w:
        w.add_sample("k1", "a.jpg", {"jpg": payload, "txt": b"cap"}, "cap")
        w.add_reject("b.jpg", "corrupt_image", "k2")
        w.add_sample("k3", "c.jpg", {"jpg": payload * 3})
        w.commit()
    return tar_url, index_url


def test_index_records_samples_and_rejects_in_order(tmp_path):
    tar_url, index_url = write_one(str(tmp_path))
    rows = read_index(index_url).to_pylist()
    assert [(r["source_id"], r["status"], r["reason"]) for r in rows] == [
        ("a.jpg", "ok", ""), ("b.jpg", "rejected", "corrupt_image"), ("c.jpg", "ok", "")]
    assert [r["bytes"] for r in rows] == [4, 0, 3]
    samples = list(iter_tar_samples(tar_url))
    assert samples == [{"__key__": "k1", "jpg": b"x", "txt": b"cap"}, {"__key__": "k3", "jpg": b"xxx"}]


def test_tar_members_have_fixed_metadata_so_bytes_are_reproducible(tmp_path):
    a, _ = write_one(str(tmp_path / "a"))
    b, _ = write_one(str(tmp_path / "b"))
    assert storage.read_bytes(a) == storage.read_bytes(b)
    with tarfile.open(a) as t:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in t.getmembers()} == {(0, 0, 0, "", 0o644)}


def test_a_failure_mid_shard_publishes_nothing(tmp_path):
    tar_url, index_url = shard_urls(str(tmp_path), 0)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tar_url, index_url) as w:
            w.add_sample("k1", "a.jpg", {"jpg": b"x"})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_commit_publishes_nothing(tmp_path):
    tar_url, index_url = shard_urls(str(tmp_path), 0)
    with ShardWriter(tar_url, index_url) as w:
        w.add_sample("k1", "a.jpg", {"jpg": b"x"})
    assert list(tmp_path.iterdir()) == []


def test_keys_are_validated(tmp_path):
    tar_url, index_url = shard_urls(str(tmp_path), 0)
    with ShardWriter(tar_url, index_url) as w:
        w.add_sample("k1", "a.jpg", {"jpg": b"x"})
        with pytest.raises(ValueError, match="duplicate key"):
            w.add_sample("k1", "b.jpg", {"jpg": b"x"})
        with pytest.raises(ValueError, match="must not contain"):
            w.add_sample("k.2", "c.jpg", {"jpg": b"x"})


def test_memory_and_file_urls_work_alike(tmp_path, memory_url):
    a, ai = write_one(f"file://{tmp_path}")
    m, mi = write_one(memory_url)
    assert storage.read_bytes(a) == storage.read_bytes(m)
    assert read_index(ai).equals(read_index(mi))
