"""``--limit N`` (``run_ingest(limit=N)``): exactly the first N inputs of a full run, nothing else."""

from __future__ import annotations

from tasks import storage
from tasks.ingest import run_ingest
from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tasks.shards import read_index


def _source_ids(result) -> list[str]:
    return [sid for url in result.shard_urls
            for sid in read_index(url[: -len(".tar")] + ".parquet").column("source_id").to_pylist()]


def test_limit_takes_the_first_inputs_of_a_full_run(memory_url):
    src = f"{memory_url}/photos"
    write_sample_folder(src)
    full = run_ingest("folder", src, f"{memory_url}/full", size=32, shard_size=2, executor="local")
    limited = run_ingest("folder", src, f"{memory_url}/limited", size=32, shard_size=2, limit=3, executor="local")
    assert full.num_inputs == len(SAMPLE_PHOTOS) > 3
    assert limited.num_inputs == limited.num_samples + limited.num_rejects == 3
    assert _source_ids(limited) == _source_ids(full)[:3]
    assert storage.read_json(f"{memory_url}/limited/manifest.json")["counts"]["inputs"] == 3
