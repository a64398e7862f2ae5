"""generate-batch: every row ends as an image or a reject; reruns skip; Ray writes the local bytes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from tasks import storage
from tasks.generation.job import GenerationConfig, run_generation
from tasks.shards import iter_tar_samples, read_index


@pytest.fixture
def job_table(tmp_path):
    cond = tmp_path / "cond"
    cond.mkdir()
    depth = np.zeros((64, 64), dtype=np.uint16)
    depth[8:40, 4:30] = 52000
    Image.fromarray(depth).save(cond / "fg_left.png")
    rows = [
        {"id": "plain-a", "prompt": "a red cube", "seed": 1, "steps": 2},
        {"id": "depth-a", "prompt": "a red cube", "seed": 2, "steps": 2, "fg_depth": "fg_left.png"},
        "this line is not json",
        {"id": "plain-b", "prompt": "a blue ball", "seed": 3, "steps": 2, "negative_prompt": "blurry"},
        {"id": "colour", "prompt": "x", "seed": 1, "colour": "red"},
        {"id": "plain-a", "prompt": "the same id again", "seed": 9},
        {"id": "nodepth", "prompt": "x", "seed": 1, "steps": 2, "bg_depth": "missing.png"},
        {"id": "plain-c", "prompt": "a green tree", "seed": 4, "steps": 2},
        {"id": "depth-b", "prompt": "a blue ball", "seed": 5, "steps": 2, "fg_depth": "fg_left.png"},
    ]
    table = tmp_path / "jobs.jsonl"
    table.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(table), str(cond)


def _tar_hashes(out: str) -> dict[str, str]:
    return {u.rsplit("/", 1)[-1]: hashlib.sha256(storage.read_bytes(u)).hexdigest()
            for u in storage.list_files(storage.join(out, "shards"), ".tar")}


def test_every_row_is_an_image_or_a_reject_and_a_rerun_skips(job_table, tmp_path):
    table, cond = job_table
    cfg = GenerationConfig(table, str(tmp_path / "out"), condition_root=cond, shard_size=4, batch_size=2)
    result = run_generation(cfg, executor="local")
    assert result.rows == 9 and result.images + result.rejects == 9
    assert result.images == 5
    assert result.rejects_by_reason == {"bad_json": 1, "unknown_field": 1, "duplicate_id": 1, "missing_condition": 1}
    samples = [s for u in result.shard_urls for s in iter_tar_samples(u)]
    assert [s["__key__"] for s in samples] == ["plain-a", "depth-a", "plain-b", "plain-c", "depth-b"]
    assert json.loads(samples[1]["json"])["fg_depth"] == "fg_left.png"
    assert json.loads(samples[2]["json"])["negative_prompt"] == "blurry"
    index = read_index(result.shard_urls[0].replace(".tar", ".parquet")).to_pylist()
    assert {r["source_id"]: r["reason"] for r in index if r["status"] != "ok"} == {"line-3": "bad_json"}
    before = _tar_hashes(cfg.out_url)
    again = run_generation(cfg, executor="local", resume=True)
    assert again.shards_written == 0 and again.shards_skipped == 3 and again.images == 5
    assert _tar_hashes(cfg.out_url) == before


@pytest.mark.slow
def test_ray_actor_pool_writes_the_local_bytes(job_table, tmp_path):
    import ray

    if not ray.is_initialized():  # a new local Ray, never another run's cluster on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    table, cond = job_table
    local = GenerationConfig(table, str(tmp_path / "local"), condition_root=cond, shard_size=4, batch_size=2)
    on_ray = GenerationConfig(table, str(tmp_path / "ray"), condition_root=cond, shard_size=4, batch_size=2,
                              actors=2)
    run_generation(local, executor="local")
    result = run_generation(on_ray, executor="ray")
    assert result.images == 5 and result.rejects == 4
    assert _tar_hashes(on_ray.out_url) == _tar_hashes(local.out_url)


def test_auto_runs_a_memory_table_in_this_process(memory_url):
    storage.write_bytes(f"{memory_url}/jobs.jsonl", b'{"id": "m1", "prompt": "a red cube", "seed": 1, "steps": 1}\n')
    result = run_generation(GenerationConfig(f"{memory_url}/jobs.jsonl", f"{memory_url}/out"), executor="auto")
    assert (result.rows, result.images) == (1, 1)
