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


class _SlowDownEveryNth:
    """WSGI middleware in front of moto: every ``n``-th object GET or PUT answers 503 SlowDown,
    as S3 does under load."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, app, n: int) -> None:
        import threading

        self.app, self.n, self.seen, self.failed, self.lock = app, n, 0, 0, threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] in ("GET", "PUT") and environ["PATH_INFO"].strip("/").count("/") >= 1:
            with self.lock:
                self.seen += 1
                fail = self.seen % self.n == 0
                self.failed += fail
            if fail:
                start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(self.BODY)))])
                return [self.BODY]
        return self.app(environ, start_response)


@pytest.fixture
def flaky_endpoint(s3_server, monkeypatch):
    """A second endpoint on the same moto backends whose every 4th object request fails with 503."""
    import threading

    import s3fs
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    flaky = _SlowDownEveryNth(DomainDispatcherApplication(create_backend_app), n=4)
    server = make_server("127.0.0.1", 0, flaky, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield flaky
    finally:
        server.shutdown()
        thread.join()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_ingest_through_s3_503s_loses_nothing(s3_bucket, flaky_endpoint, tmp_path):
    """503 SlowDown on a quarter of the object requests: the clients retry, every photo becomes the
    same sample as in a clean run, and no read error turns into a reject."""
    from tasks.ingest import run_ingest
    from tasks.sample_images import write_sample_folder
    from tasks.shards import read_index

    photos = ["chelsea.png", "coffee.png", "rocket.jpg"]
    write_sample_folder(str(tmp_path / "photos"), photos)
    clean = run_ingest("folder", str(tmp_path / "photos"), str(tmp_path / "clean"), size=32, shard_size=2,
                       executor="local")
    write_sample_folder(f"{s3_bucket}/photos", photos)
    result = run_ingest("folder", f"{s3_bucket}/photos", f"{s3_bucket}/out", size=32, shard_size=2, executor="local")
    assert flaky_endpoint.failed >= 2
    assert (result.num_inputs, result.num_samples, result.num_rejects) == (len(photos), len(photos), 0)
    for i in range(2):
        assert storage.read_bytes(f"{s3_bucket}/out/shards/shard-{i:06d}.tar") == \
            storage.read_bytes(str(tmp_path / "clean" / "shards" / f"shard-{i:06d}.tar"))
        assert read_index(f"{s3_bucket}/out/shards/shard-{i:06d}.parquet").to_pylist() == \
            read_index(str(tmp_path / "clean" / "shards" / f"shard-{i:06d}.parquet")).to_pylist()
    assert clean.num_samples == len(photos)
