"""Ingest on a real local Ray: accounting, readability by three readers, byte-identical re-runs, resume."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.ingest import OutputConflict, run_ingest, sample_key
from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder

pytestmark = pytest.mark.slow
N = len(SAMPLE_PHOTOS)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_sample_folder(str(folder))
    return folder


@pytest.fixture(scope="module")
def ingested(ray_local, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest") / "out"
    result = run_ingest("folder", str(photos), str(out), size=64, shard_size=2)
    return out, result


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_photo_becomes_a_sample_in_deterministic_shards(ingested):
    out, result = ingested
    assert (result.num_inputs, result.num_samples, result.num_rejects) == (N, N, 0)
    assert len(result.shard_urls) == math.ceil(N / 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": N, "samples": N, "rejects": 0, "duplicates": 0, "retried": 0,
                                  "rejects_by_reason": {}}
    assert [s["samples"] for s in manifest["shards"]] == [2] * (N // 2) + [1] * (N % 2)
    index = pq.read_table(out / "shards" / "shard-000000.parquet").to_pylist()
    # listing order is sorted source ids; keys derive from them
    first_two = sorted(SAMPLE_PHOTOS)[:2]
    assert [r["source_id"] for r in index] == first_two
    assert [r["key"] for r in index] == [sample_key(s) for s in first_two]
    assert all(r["status"] == "ok" and r["reason"] == "" for r in index)
    assert pq.read_table(out / "rejects.parquet").num_rows == 0


def test_shards_read_back_with_webdataset(ingested):
    import webdataset as wds

    out, result = ingested
    ds = wds.WebDataset(result.shard_urls, shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert len(samples) == N
    assert len({s["__key__"] for s in samples}) == N
    captions = {s["txt"].decode() for s in samples}
    assert captions == set(SAMPLE_PHOTOS.values())
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (64, 64) and img.mode == "RGB"
        meta = json.loads(s["json"])
        assert meta["source_id"] in SAMPLE_PHOTOS


def test_shards_read_back_with_wids(ingested):
    import wids

    out, result = ingested
    counts = [pq.read_metadata(u[: -len(".tar")] + ".parquet").num_rows for u in result.shard_urls]
    ds = wids.ShardListDataset([{"url": u, "nsamples": n} for u, n in zip(result.shard_urls, counts)])
    assert len(ds) == N
    keys = {ds[i]["__key__"] for i in range(len(ds))}
    assert keys == {sample_key(s) for s in SAMPLE_PHOTOS}


def test_shards_read_back_with_ray_data(ingested):
    import ray

    out, _ = ingested
    rows = ray.data.read_webdataset(str(out / "shards"), file_extensions=["tar"], decoder=None).take_all()
    assert len(rows) == N
    assert {r["__key__"] for r in rows} == {sample_key(s) for s in SAMPLE_PHOTOS}


def test_rerun_skips_everything_and_a_fresh_run_is_byte_identical(ingested, photos, tmp_path):
    out, _ = ingested
    before = tree_bytes(out)
    again = run_ingest("folder", str(photos), str(out), size=64, shard_size=2)
    assert again.shards_written == 0 and again.num_samples == N
    assert tree_bytes(out) == before
    # a fresh run elsewhere, in-process instead of on Ray: the very same bytes
    other = tmp_path / "other"
    run_ingest("folder", str(photos), str(other), size=64, shard_size=2, executor="local")
    assert tree_bytes(other) == before


def test_resume_redoes_only_what_is_missing(ingested, photos, tmp_path):
    out, _ = ingested
    copy = tmp_path / "crashed"
    before = tree_bytes(out)
    for rel, data in before.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    # a crash after shard 0 was committed and while shard 1 was being written
    (copy / "shards" / "shard-000001.parquet").unlink()
    (copy / "shards" / "shard-000001.tar").rename(copy / "shards" / ".shard-000001.tar.tmp-dead")
    (copy / "manifest.json").unlink()
    with pytest.raises(OutputConflict, match="--resume"):
        run_ingest("folder", str(photos), str(copy), size=64, shard_size=2, executor="local")
    written = []
    result = run_ingest("folder", str(photos), str(copy), size=64, shard_size=2, executor="local", resume=True,
                        on_shard=written.append)
    assert [w["shard"] for w in written] == [1]
    assert result.shards_written == 1 and result.num_samples == N
    assert tree_bytes(copy) == before  # the dead run's temporary file was swept, nothing else differs


def test_a_different_config_into_the_same_output_is_refused(ingested, photos):
    out, _ = ingested
    with pytest.raises(OutputConflict, match="different config"):
        run_ingest("folder", str(photos), str(out), size=32, shard_size=2, executor="local")


def test_ingest_between_s3_buckets_on_a_real_s3_server(ray_local, s3_bucket):
    src = f"{s3_bucket}/photos"
    write_sample_folder(src, ["chelsea.png", "coffee.png", "rocket.jpg"])
    result = run_ingest("folder", src, f"{s3_bucket}/out", size=32, shard_size=2)
    assert (result.num_inputs, result.num_samples) == (3, 3)
    from tasks import storage

    manifest = storage.read_json(f"{s3_bucket}/out/manifest.json")
    assert manifest["counts"]["samples"] == 3
    assert storage.list_files(f"{s3_bucket}/out/shards", ".tar") == [
        f"{s3_bucket}/out/shards/shard-000000.tar", f"{s3_bucket}/out/shards/shard-000001.tar"]


def test_memory_urls_run_in_process_and_are_refused_on_ray(memory_url):
    src = f"{memory_url}/photos"
    write_sample_folder(src, ["chelsea.png", "coffee.png"])
    with pytest.raises(ValueError, match="memory://"):
        run_ingest("folder", src, f"{memory_url}/out-ray", size=32)
    result = run_ingest("folder", src, f"{memory_url}/out", size=32, executor="local")
    assert result.num_samples == 2
