"""build-triplets reads a shard as several blocks (parts) when shards are fewer than workers, so one
shard keeps a whole pool busy: Ray's actor pools and the process pool alike."""

from __future__ import annotations

import pytest

from tasks.ingest import run_ingest
from tasks.run_options import RunOptions
from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tasks.triplets.job import StageOptions, TripletsConfig, read_dataset, run_triplets
from tasks.shards import read_index

pytestmark = pytest.mark.slow


def test_a_one_shard_job_is_read_as_one_block_per_actor(ray_local, tmp_path):
    write_sample_folder(str(tmp_path / "photos"))
    n = len(SAMPLE_PHOTOS)
    run_ingest("folder", str(tmp_path / "photos"), str(tmp_path / "ingest"), size=32, shard_size=n, executor="local")
    keys = set(read_index(str(tmp_path / "ingest" / "shards" / "shard-000000.parquet")).column("key").to_pylist())
    stages = {"saliency": StageOptions(batch_size=4), "inpaint": StageOptions(batch_size=2),
              "depth": StageOptions(batch_size=3)}
    cfg = TripletsConfig(str(tmp_path / "ingest"), str(tmp_path / "out"), stages=stages)
    blocks = [list(b["key"]) for b in read_dataset(cfg, {0: keys}, actors=2).iter_batches(batch_size=None)]
    # two actors, one shard: two blocks, every row in exactly one of them
    assert len(blocks) == 2 and sorted(k for b in blocks for k in b) == sorted(keys)
    one = [list(b["key"]) for b in read_dataset(cfg, {0: keys}, actors=1).iter_batches(batch_size=None)]
    assert len(one) == 1


def test_a_one_shard_job_runs_on_every_pool_worker_and_writes_the_local_bytes(tmp_path):
    write_sample_folder(str(tmp_path / "photos"))
    n = len(SAMPLE_PHOTOS)
    run_ingest("folder", str(tmp_path / "photos"), str(tmp_path / "ingest"), size=32, shard_size=n, executor="local")
    stages = {"inpaint": StageOptions(batch_size=2, cfg={"num_inference_steps": 2})}
    local = run_triplets(str(tmp_path / "ingest"), str(tmp_path / "local"), stages=stages, executor="local")
    pooled = run_triplets(str(tmp_path / "ingest"), str(tmp_path / "pool"), stages=stages, executor="processes",
                          run_options=RunOptions(workers=2))
    assert len(pooled.shard_urls) == 1 and pooled.num_triplets + pooled.num_rejects == n
    # one shard, two workers: both ran every model stage (parts of the shard), one process did locally
    assert pooled.stage_workers == {s: 2 for s in local.stage_workers}
    assert set(local.stage_workers.values()) == {1}
    tars = [(root / "shards" / "shard-000000.tar").read_bytes() for root in (tmp_path / "local", tmp_path / "pool")]
    assert tars[0] == tars[1]
