"""Atomic writes against a real S3 protocol server (moto): a failed write publishes nothing."""

from __future__ import annotations

import os

import pytest

from tasks import storage
from tasks.shards import ShardWriter, iter_tar_samples, shard_urls


def _s3fs():
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["S3_ENDPOINT_URL"]}, skip_instance_cache=True)


def test_a_shard_that_fails_mid_write_leaves_the_committed_one_intact(s3_bucket):
    tar_url, index_url = shard_urls(f"{s3_bucket}/shards", 0)
    with ShardWriter(tar_url, index_url) as w:
        w.add_sample("old", "old.jpg", {"jpg": b"committed"})
        w.commit()
    before = storage.read_bytes(tar_url), storage.read_bytes(index_url)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tar_url, index_url) as w:
            w.add_sample("new", "new.jpg", {"jpg": b"x" * 1000})
            raise RuntimeError("boom")
    assert (storage.read_bytes(tar_url), storage.read_bytes(index_url)) == before
    assert [s["__key__"] for s in iter_tar_samples(tar_url)] == ["old"]


def test_a_multipart_write_that_fails_leaves_no_object_and_no_open_upload(s3_bucket):
    url = f"{s3_bucket}/big.bin"
    block = os.urandom(1 << 20)
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_open(url) as fh:
            for _ in range(12):  # > 2 parts of s3fs' 5 MiB blocks: a multipart upload is under way
                fh.write(block)
            raise RuntimeError("boom")
    fs = _s3fs()
    bucket = s3_bucket[len("s3://"):]
    assert not fs.exists(f"{bucket}/big.bin")
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    with storage.atomic_open(url) as fh:  # and a write that ends normally publishes it whole
        for _ in range(12):
            fh.write(block)
    assert fs.info(f"{bucket}/big.bin")["size"] == 12 << 20
