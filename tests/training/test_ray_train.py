"""Ray Train: two DDP workers see every sample once per epoch and export a pipeline that generates;
a killed worker resumes from the last checkpoint (on S3) and the run ends with the uninterrupted
run's number of optimizer steps."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from cnc_model.loading import load_pipeline
from tasks import storage
from tasks.training.config import DataConfig, OptimConfig, ScalingSpec, stage_config
from tasks.training.job import run_training
from tasks.training.loop import total_steps
from tasks.training import data

# the hooks below run inside Ray workers: ship them by value, not as an import of this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow


class KeyLog:
    """Appends each step's keys, per worker, to a JSON-lines file (workers are other processes)."""

    def __init__(self, folder: str, kill_rank: int | None = None, kill_step: int | None = None,
                 registered: tuple[str, str] | None = None) -> None:
        self.folder, self.kill_rank, self.kill_step, self.registered = folder, kill_rank, kill_step, registered

    def __call__(self, info: dict) -> None:
        with open(os.path.join(self.folder, f"rank-{info['rank']}.jsonl"), "a") as fh:
            fh.write(json.dumps(info) + "\n")
        marker = os.path.join(self.folder, "killed")
        if info["rank"] == self.kill_rank and info["step"] == self.kill_step and not os.path.exists(marker):
            Path(marker).touch()
            if self.registered:  # kill only once the controller has registered the previous checkpoint
                wait_for_text(*self.registered)
            os._exit(1)  # the worker process dies mid-epoch, as on a lost node


def wait_for_text(url: str, text: str, deadline_s: float = 120.0) -> None:
    """Poll ``url`` until it contains ``text`` (Ray Train's controller registers a reported
    checkpoint a moment after ``report`` returns, in its checkpoint manager snapshot)."""
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if storage.exists(url) and text in storage.read_bytes(url).decode():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} never appeared in {url}")


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def ray_config(stage: str, data_url: str, out: str, hook: KeyLog, **changes):
    base = dict(out=out, epochs=2, batch_size=4, on_step=hook, optim=OptimConfig(lr=1e-3),
                data=DataConfig(url=data_url, val_fraction=0.0, decode_cpus=0.25),
                scaling=ScalingSpec(workers=2, cpus_per_worker=0.5, max_failures=1))
    return stage_config(stage, **{**base, **changes})


@pytest.fixture(scope="module")
def killed_run(ray_two_cpus, s3_server, tmp_path_factory):
    """One Ray Train run (2 workers, data and checkpoints on S3) whose rank 1 dies at step 3, in the
    second epoch; shared by the tests below (a Ray Train run costs tens of seconds here)."""
    import s3fs

    from tests.fixtures.triplets import write_triplet_shards

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir("cnc-ray-train")
    s3_bucket = "s3://cnc-ray-train"
    data_url = storage.join(s3_bucket, "triplets")
    keys = write_triplet_shards(data_url, 8, shard_size=4)
    log = tmp_path_factory.mktemp("log")
    run = storage.join(s3_bucket, "run")
    snapshot = (storage.join(run, "checkpoints", "checkpoint_manager_snapshot.json"), "checkpoint-00000002")
    cfg = ray_config("full", data_url, run, KeyLog(str(log), kill_rank=1, kill_step=3, registered=snapshot))
    uninterrupted = total_steps(cfg, data.plan_data(data_url, "full", 0.0, 2))
    return cfg, keys, log, uninterrupted, run_training(cfg)


def test_two_workers_see_every_sample_once_per_epoch_and_export_a_pipeline(killed_run):
    cfg, keys, log, _, result = killed_run
    records = read_log(log)
    final = {}  # (rank, step) -> the last record: what the finished run consumed
    for r in records:
        final[r["rank"], r["step"]] = r
    for epoch in (0, 1):
        chosen = [r for r in final.values() if r["epoch"] == epoch]
        assert Counter(k for r in chosen for k in r["keys"]) == Counter(keys), epoch  # each key once per epoch
        by_rank = [{k for r in chosen if r["rank"] == rank for k in r["keys"]} for rank in (0, 1)]
        assert len(by_rank[0]) == len(by_rank[1]) == 4 and not by_rank[0] & by_rank[1]

    model = storage.get_fs(result.model_url)
    with tempfile.TemporaryDirectory() as tmp:
        model[0].get(model[1] + "/", tmp, recursive=True)
        pipe = load_pipeline(tmp)
    plan = data.plan_data(cfg.data.url, "full", 0.0, 1)
    row = next(data.local_rows(plan, None, 0.0, "train"))
    image = pipe("object 0", fg_depth=torch.from_numpy(row["fg_depth"]), bg_depth=torch.from_numpy(row["bg_depth"]),
                 fg_image_embeds=torch.from_numpy(row["clip_fg"])[None], bg_image_embeds=torch.from_numpy(row["clip_bg"])[None],
                 num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert result.report["data"]["train_samples"] == 8 and result.report["config"]["scaling"]["workers"] == 2


def test_a_killed_worker_resumes_from_the_last_checkpoint_on_s3(killed_run):
    cfg, _, log, uninterrupted, result = killed_run
    assert (log / "killed").exists()
    assert result.steps == uninterrupted == 4  # 8 samples / (2 workers x 2 per micro-batch) x 2 epochs
    assert [h["step"] for h in result.report["history"]] == [1, 2, 3, 4]  # resumed at step 2's checkpoint
    steps_rank1 = [r["step"] for r in read_log(log) if r["rank"] == 1]
    assert steps_rank1 == [1, 2, 3, 3, 4]  # step 3 ran twice: before the kill and after the restart
    fs, path = storage.get_fs(cfg.out)
    assert fs.exists(f"{path}/checkpoints/checkpoint-00000002/local_fuser.safetensors")
    assert fs.exists(f"{path}/model/model_index.json") and fs.exists(f"{path}/train_report.json")
