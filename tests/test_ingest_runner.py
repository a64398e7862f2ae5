"""Ingest on the shard runner, in process on memory://: the data-safety items of issue 15 that
concern a whole ingest run (lease, changed source, transient errors, all-rejected runs, exit codes)."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tasks import storage
from tasks.ingest import run_ingest
from tasks.lease import Lease, OutputBusy
from tasks.sample_images import write_sample_folder
from tasks.shard_job import OutputConflict, TooManyRejects
from tasks.sources.folder import FolderSource

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]


@pytest.fixture
def photos(memory_url) -> str:
    write_sample_folder(f"{memory_url}/photos", PHOTOS)
    return f"{memory_url}/photos"


def ingest(src: str, out: str, **kw):
    return run_ingest("folder", src, out, size=16, min_side=8, shard_size=2, executor="local", **kw)


def test_ingest_refuses_an_output_that_another_live_run_holds(photos, memory_url):
    out = f"{memory_url}/out"
    holder = Lease(out, seconds=60).acquire()
    with pytest.raises(OutputBusy, match="being written by another run"):
        ingest(photos, out)
    assert not storage.exists(f"{out}/shards")
    holder.release()
    assert ingest(photos, out).num_samples == 3


def test_resume_after_the_source_changed_is_refused(photos, memory_url):
    out = f"{memory_url}/out"
    ingest(photos, out)
    fs, root = storage.get_fs(out)
    fs.rm_file(f"{root}/manifest.json")
    fs.rm_file(f"{root}/shards/shard-000001.parquet")  # a crash before the last shard's commit
    write_sample_folder(photos, ["astronaut.png"])  # sorts first: every planned shard moves
    with pytest.raises(OutputConflict, match="source changed"):
        ingest(photos, out, resume=True)


def test_a_transient_read_error_retries_the_shard_instead_of_rejecting(photos, memory_url, monkeypatch):
    calls = {"n": 0}
    real_load = FolderSource.load

    def flaky_load(self, refs):
        calls["n"] += 1
        for i, item in enumerate(real_load(self, refs)):
            if calls["n"] == 1 and i == 1:
                raise ConnectionResetError("connection reset by peer")
            yield item

    monkeypatch.setattr(FolderSource, "load", flaky_load)
    result = ingest(photos, f"{memory_url}/out")
    assert (result.num_samples, result.num_rejects) == (3, 0)
    assert calls["n"] == 3  # shard 0 twice (the first attempt failed), shard 1 once


def test_a_permanent_reader_error_rejects_the_rest_of_the_shard_with_its_detail(photos, memory_url, monkeypatch):
    real_load = FolderSource.load

    def broken_load(self, refs):
        for i, item in enumerate(real_load(self, refs)):
            if i == 1:
                raise ValueError("index entry 7 is garbage")
            yield item

    monkeypatch.setattr(FolderSource, "load", broken_load)
    result = ingest(photos, f"{memory_url}/out")
    assert (result.num_samples, result.num_rejects) == (2, 1)
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{memory_url}/out/rejects.parquet"))).to_pylist()
    assert rows == [{"source_id": "coffee.png", "reason": "source_read_error", "shard": 0,
                     "detail": "ValueError: index entry 7 is garbage", "retryable": False}]


def test_a_run_in_which_every_input_is_rejected_fails(memory_url):
    for name in ("a.jpg", "b.jpg"):
        storage.write_bytes(f"{memory_url}/junk/{name}", b"not an image")
    with pytest.raises(TooManyRejects, match="2 of 2 inputs were rejected"):
        ingest(f"{memory_url}/junk", f"{memory_url}/out")


def test_cli_exit_codes_usage_2_runtime_1(photos, memory_url):
    from flows.cli import app

    runner = CliRunner()
    base = ["ingest", "--source-format", "folder", "--size", "16", "--executor", "local"]
    storage.write_bytes(f"{memory_url}/junk/a.jpg", b"not an image")
    all_rejected = runner.invoke(app, [*base, "--source", f"{memory_url}/junk", "--out", f"{memory_url}/o1"])
    assert all_rejected.exit_code == 1, all_rejected.output
    assert "1 of 1 inputs were rejected" in all_rejected.output
    holder = Lease(f"{memory_url}/o2", seconds=60).acquire()
    busy = runner.invoke(app, [*base, "--source", photos, "--out", f"{memory_url}/o2"])
    holder.release()
    assert busy.exit_code == 1 and "another run" in busy.output
    bad_executor = runner.invoke(app, [*base, "--executor", "spark", "--source", photos, "--out", f"{memory_url}/o3"])
    assert bad_executor.exit_code == 2 and "unknown --executor 'spark'" in bad_executor.output
    ok = runner.invoke(app, [*base, "--source", photos, "--out", f"{memory_url}/o4", "--shard-size", "2"])
    assert ok.exit_code == 0, ok.output
    conflict = runner.invoke(app, [*base, "--source", photos, "--out", f"{memory_url}/o4", "--shard-size", "3"])
    assert conflict.exit_code == 2 and "different config" in conflict.output
