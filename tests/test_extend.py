"""Growing datasets (issue 13, item 1): ``--extend`` appends new inputs as new shards after the
existing ones, skips inputs already present (by source id or by bytes), retries transient rejects
and never rewrites an earlier shard."""

from __future__ import annotations

import pytest

from tasks import storage
from tasks.ingest import run_ingest
from tasks.sample_images import sample_photo_bytes, write_sample_folder
from tasks.shard_job import OutputConflict
from tasks.shards import read_index
from tasks.sources.base import SourceItem
from tasks.sources.folder import FolderSource
from tasks.triplets.job import StageOptions, run_triplets

FIRST = ["chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg"]
FLAKY = "motorcycle_left.png"  # a reader marks it a retryable reject in the first run (its cause may pass)


def ingest(src: str, out: str, size: int = 16, **kw):
    return run_ingest("folder", src, out, size=size, min_side=8, shard_size=2, executor="local", **kw)


def flaky(real_item):
    """FolderSource._item, except that FLAKY is a reject its reader marks retryable."""
    def item(ref, image, caption):
        if ref == FLAKY:
            return SourceItem(ref, error="rate_limited", meta={"retryable": True, "detail": "try later"})
        return real_item(ref, image, caption)
    return item


def shard_files(out: str) -> dict[str, bytes]:
    return {url.rsplit("/", 1)[-1]: storage.read_bytes(url) for url in storage.list_files(f"{out}/shards")}


def rows_of(out: str, shard: int) -> list[dict]:
    return read_index(f"{out}/shards/shard-{shard:06d}.parquet").select(["source_id", "status", "reason"]).to_pylist()


@pytest.fixture
def grown(memory_url, monkeypatch):
    """A first ingest of 5 inputs (one corrupt, one timing out), then the folder grows by 2 new photos
    and 2 copies of old ones under new names."""
    src, out = f"{memory_url}/photos", f"{memory_url}/ingest"
    write_sample_folder(src, FIRST)
    storage.write_bytes(f"{src}/broken.jpg", b"not an image at all")
    real_item = FolderSource._item
    monkeypatch.setattr(FolderSource, "_item", staticmethod(flaky(real_item)))
    first = ingest(src, out)
    monkeypatch.setattr(FolderSource, "_item", staticmethod(real_item))
    before = shard_files(out)
    write_sample_folder(src, ["astronaut.png", "hubble_deep_field.jpg"])
    storage.write_bytes(f"{src}/copy_of_coffee.png", sample_photo_bytes("coffee.png"))
    storage.write_bytes(f"{src}/zz_chelsea_again.png", sample_photo_bytes("chelsea.png"))
    return src, out, first, before


def test_extend_appends_only_new_inputs_and_keeps_old_shards(grown):
    src, out, first, before = grown
    assert (first.num_inputs, first.num_samples, first.num_rejects) == (5, 3, 2)
    assert sorted(before) == [f"shard-{i:06d}.{e}" for i in range(3) for e in ("parquet", "tar")]
    rejects = storage.read_json(f"{out}/manifest.json")["counts"]["rejects_by_reason"]
    assert rejects == {"not_an_image": 1, "rate_limited": 1}
    retryable = {r["source_id"]: r["retryable"] for r in read_index(f"{out}/rejects.parquet").to_pylist()}
    assert retryable == {"broken.jpg": False, FLAKY: True}

    with pytest.raises(OutputConflict, match="--extend"):
        ingest(src, out)  # a grown source without --extend is refused, not mixed in

    result = ingest(src, out, extend=True)
    after = shard_files(out)
    assert {k: after[k] for k in before} == before  # earlier shards byte-identical
    assert sorted(after) == [f"shard-{i:06d}.{e}" for i in range(6) for e in ("parquet", "tar")]
    manifest = storage.read_json(f"{out}/manifest.json")
    assert [s["tar"] for s in manifest["shards"]] == [f"shards/shard-{i:06d}.tar" for i in range(6)]
    assert manifest["segments"] == [0, 3]
    # the retried timeout comes first, then the new names in listing order; the corrupt file is not retried
    new_rows = [r for i in (3, 4, 5) for r in rows_of(out, i)]
    assert [(r["source_id"], r["status"]) for r in new_rows] == [
        (FLAKY, "ok"), ("astronaut.png", "ok"), ("copy_of_coffee.png", "duplicate"),
        ("hubble_deep_field.jpg", "ok"), ("zz_chelsea_again.png", "duplicate")]
    assert result.num_present == 4 and result.num_duplicates == 2 and result.num_retried == 1
    # over both runs: 9 distinct inputs, each a sample, a reject or a duplicate, exactly once
    counts = manifest["counts"]
    assert (counts["samples"], counts["rejects"], counts["duplicates"], counts["inputs"]) == (6, 1, 2, 9)
    assert counts["samples"] + counts["rejects"] + counts["duplicates"] == counts["inputs"] == 9
    assert [r["source_id"] for r in read_index(f"{out}/rejects.parquet").to_pylist()] == ["broken.jpg"]

    again = ingest(src, out, extend=True)  # nothing new: nothing written, the same counts
    assert again.shards_written == 0 and shard_files(out) == after
    assert storage.read_json(f"{out}/manifest.json")["counts"] == counts
    assert storage.read_json(f"{out}/manifest.json")["segments"] == [0, 3]  # no empty segment listed


def test_a_crashed_extension_resumes_with_the_same_plan(grown):
    src, out, _first, before = grown
    ingest(src, out, extend=True)
    done = shard_files(out)
    fs, root = storage.get_fs(out)
    fs.rm_file(f"{root}/manifest.json")
    fs.rm_file(f"{root}/shards/shard-000004.parquet")  # a crash before shard 4's commit
    fs.rm_file(f"{root}/shards/shard-000005.parquet")
    with pytest.raises(OutputConflict, match="--resume"):
        ingest(src, out, extend=True)  # an unfinished extension is finished first
    result = ingest(src, out, resume=True)
    assert result.shards_written == 2 and shard_files(out) == done
    assert storage.read_json(f"{out}/manifest.json")["counts"]["inputs"] == 9


def test_resume_retries_transient_rejects_alone(memory_url, monkeypatch):
    src, out = f"{memory_url}/photos", f"{memory_url}/ingest"
    write_sample_folder(src, FIRST)
    real_item = FolderSource._item
    monkeypatch.setattr(FolderSource, "_item", staticmethod(flaky(real_item)))
    assert ingest(src, out).num_rejects == 1
    monkeypatch.setattr(FolderSource, "_item", staticmethod(real_item))
    result = ingest(src, out, resume=True)
    assert (result.num_inputs, result.num_samples, result.num_rejects, result.num_retried) == (4, 4, 0, 1)
    assert [r["source_id"] for r in rows_of(out, 2)] == [FLAKY]


@pytest.mark.slow
def test_build_triplets_extend_processes_only_the_new_ingest_shards(memory_url):
    src, ing, out = f"{memory_url}/photos", f"{memory_url}/ingest", f"{memory_url}/triplets"
    stages = {"inpaint": StageOptions(batch_size=4, cfg={"num_inference_steps": 1})}
    write_sample_folder(src, ["chelsea.png", "coffee.png"])
    ingest(src, ing, size=32)
    triplets = lambda **kw: run_triplets(ing, out, preset="tiny", stages=stages, executor="local", **kw)  # noqa: E731
    first = triplets()
    before = shard_files(out)
    write_sample_folder(src, ["astronaut.png", "rocket.jpg"])
    storage.write_bytes(f"{src}/zz_coffee_again.png", sample_photo_bytes("coffee.png"))
    ingest(src, ing, size=32, extend=True)  # shards 1 and 2
    with pytest.raises(OutputConflict, match="--extend"):
        triplets()
    seen: list[int] = []
    result = triplets(extend=True, on_shard=seen.append)
    assert seen == [1, 2] and result.shards_written == 2 and result.num_duplicates == 1
    after = shard_files(out)
    assert {k: after[k] for k in before} == before
    assert sorted(after) == [f"shard-{i:06d}.{e}" for i in range(3) for e in ("parquet", "tar")]
    counts = storage.read_json(f"{out}/manifest.json")["counts"]
    assert counts["duplicates"] == 1 and counts["sources"] == 5 == first.num_sources + 3
    assert counts["triplets"] + counts["rejects"] + counts["duplicates"] == counts["sources"]
    assert rows_of(out, 2)[-1] == {"source_id": "zz_coffee_again.png", "status": "duplicate",
                                   "reason": "ingest:duplicate_content"}


def test_the_committed_event_names_the_redacted_output_and_the_manifest(monkeypatch):
    import prefect.events
    from prefect.events import Event

    from flows.triplets_flow import COMMITTED_EVENT, emit_committed

    sent: list[Event] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(Event(**kw)))
    result = {"out_url": "s3://bucket/out/triplets", "manifest_sha256": "ab" * 32, "shards_written": 2,
              "shard_urls": ["a", "b", "c"], "num_sources": 5, "num_triplets": 3, "num_rejects": 1}
    emit_committed(result)
    emit_committed({**result, "out_url": "s3://user:secret@bucket/out/triplets?X-Amz-Signature=abc"})
    plain, with_secret = sent
    assert plain.event == COMMITTED_EVENT == "cnc.triplets.committed"
    assert plain.resource.id == "cnc.triplets.s3://bucket/out/triplets"
    assert plain.payload == {"out": "s3://bucket/out/triplets", "manifest_sha256": "ab" * 32, "shards_written": 2,
                             "shards": 3, "sources": 5, "triplets": 3, "rejects": 1}
    text = with_secret.model_dump_json()
    assert "secret" not in text and "Signature" not in text and "user" not in text


def test_the_cli_and_the_cluster_job_pass_extend(tmp_path):
    import json
    import shlex

    from typer.testing import CliRunner

    from flows.cli import app
    from flows.params import BuildTripletsParams
    from flows.triplets_flow import cluster_job_spec

    src, out = tmp_path / "photos", tmp_path / "ingest"
    write_sample_folder(str(src), ["coffee.png"])
    args = ["ingest", "--source-format", "folder", "--source", str(src), "--out", str(out), "--size", "16",
            "--executor", "local"]
    assert CliRunner().invoke(app, args).exit_code == 0
    write_sample_folder(str(src), ["rocket.jpg"])
    (src / "same_coffee.png").write_bytes(sample_photo_bytes("coffee.png"))
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--extend" in refused.output
    # worker processes see the known content hashes too (they travel with the job)
    grown = CliRunner().invoke(app, [*args, "--extend", "--executor", "processes", "--shard-size", "1"])
    assert grown.exit_code == 2 and "different config" in grown.output  # shard size is part of the config
    grown = CliRunner().invoke(app, [*args[:-1], "processes", "--extend"])
    assert grown.exit_code == 0, grown.output
    assert "3 inputs -> 2 samples + 0 rejects + 1 duplicates" in grown.output
    assert "1 listed inputs were already there" in grown.output

    spec = cluster_job_spec(BuildTripletsParams(source="s3://b/src", out="s3://b/out", extend=True), "run-1")
    body = json.loads(shlex.split(spec.entrypoint)[3])
    assert body["ingest"]["extend"] is True and body["triplets"]["extend"] is True
