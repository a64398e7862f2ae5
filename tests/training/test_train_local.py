"""The training loop in this process (``executor="local"``, the loop Ray Train workers run):
overfitting per stage, the three-stage chain, exact resume, official-layout init, S3 resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from cnc_model.cnc.local_fuser import LocalFuser
from cnc_model.cnc.pipeline_cnc import CnCPipeline
from cnc_model.loading import tiny_cnc_pipeline
from tasks import storage
from tasks.training import data
from tasks.training.config import DataConfig, OptimConfig, ScalingSpec, TrainConfig, stage_config
from tasks.training.job import run_all, run_training
from tasks.training.models import start_pipeline
from tasks.training.step import build_step


def config(stage: str, triplets_url: str, out: str, **changes) -> TrainConfig:
    base = dict(out=out, epochs=2, batch_size=4, data=DataConfig(url=triplets_url, val_fraction=0.0),
                scaling=ScalingSpec(executor="local"), optim=OptimConfig(lr=1e-3))
    return stage_config(stage, **{**base, **changes})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fixed_noise_loss(cfg: TrainConfig, model: str) -> float:
    """The training set's loss with fixed noise and timesteps, no dropout."""
    cfg = dataclasses.replace(cfg, init=model)
    step = build_step(cfg, start_pipeline(cfg), torch.device("cpu"))
    step.dropout = type(step.dropout)(0.0, 0.0)
    for m in step.trainable_modules():
        m.eval()
    plan = data.plan_data(cfg.data.url, cfg.stage, 0.0, 1)
    batch = data.to_cnc_batch(data.stack_rows(list(data.local_rows(plan, None, 0.0, "train"))), torch.device("cpu"))
    with torch.no_grad():
        return sum(step.loss(batch, torch.Generator().manual_seed(s)).item() for s in range(3)) / 3


@pytest.mark.slow
@pytest.mark.parametrize("stage, lr, steps, ratio", [("local", 2e-3, 12, 0.8), ("global", 1e-2, 12, 0.95),
                                                     ("full", 2e-3, 12, 0.8)])
def test_overfitting_lowers_the_loss_and_changes_only_the_stage(triplets, tmp_path, stage, lr, steps, ratio):
    cfg = config(stage, triplets[0], str(tmp_path / stage), epochs=steps, batch_size=8, text_dropout=0.0,
                 condition_dropout=0.0, optim=OptimConfig(lr=lr))
    result = run_training(cfg)
    assert result.steps == steps and len(result.report["history"]) == steps
    before, after = fixed_noise_loss(cfg, "tiny"), fixed_noise_loss(cfg, result.model_url)
    assert after < ratio * before, (before, after)

    start, trained = tiny_cnc_pipeline(), CnCPipeline.from_pretrained(result.model_url)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        assert same(state(getattr(start, name)), state(getattr(trained, name))), name
    changed = {"local": {"local_fuser"}, "global": {"global_fuser"}, "full": {"local_fuser", "global_fuser"}}[stage]
    for name in ("local_fuser", "global_fuser"):
        assert same(state(getattr(start, name)), state(getattr(trained, name))) == (name not in changed), name


@pytest.mark.slow
def test_three_stage_chain_starts_each_stage_from_the_previous_one(triplets, tmp_path):
    base = config("local", triplets[0], str(tmp_path / "chain"), batch_size=8)
    results = run_all(base, epochs=1)
    assert [r.stage for r in results] == ["local", "global", "full"]
    assert [r.steps for r in results] == [1, 1, 1]
    local, glob, full = (CnCPipeline.from_pretrained(r.model_url) for r in results)
    tiny = tiny_cnc_pipeline()
    assert results[1].report["config"]["init"] == results[0].model_url
    assert results[2].report["config"]["init"] == results[1].model_url
    assert not same(state(tiny.local_fuser), state(local.local_fuser))
    assert same(state(local.local_fuser), state(glob.local_fuser))  # global keeps the trained local fuser
    assert not same(state(tiny.global_fuser), state(glob.global_fuser))
    assert not same(state(glob.local_fuser), state(full.local_fuser))  # full trains both
    assert not same(state(glob.global_fuser), state(full.global_fuser))
    again = run_all(base, epochs=1)  # a finished chain is not trained again
    assert all(r.skipped for r in again)


class Interrupt(RuntimeError):
    pass


@pytest.mark.slow
def test_an_interrupted_run_resumed_ends_with_the_weights_of_an_uninterrupted_one(triplets, tmp_path):
    full = run_training(config("full", triplets[0], str(tmp_path / "straight")))
    assert full.steps == 4  # 2 epochs of 2 steps

    def crash_in_second_epoch(info):
        if info["step"] == 3:
            raise Interrupt("killed")

    out = str(tmp_path / "resumed")
    with pytest.raises(Interrupt):
        run_training(config("full", triplets[0], out, on_step=crash_in_second_epoch))
    assert storage.exists(storage.join(out, "checkpoints", "checkpoint-00000002", "_COMPLETE"))  # epoch boundary
    assert not storage.exists(storage.join(out, "model"))
    resumed = run_training(config("full", triplets[0], out), resume=True)
    assert resumed.steps == 4 and [h["step"] for h in resumed.report["history"]] == [1, 2, 3, 4]
    a, b = CnCPipeline.from_pretrained(full.model_url), CnCPipeline.from_pretrained(resumed.model_url)
    for name in ("local_fuser", "global_fuser"):
        assert same(state(getattr(a, name)), state(getattr(b, name))), name
    assert [h["loss"] for h in resumed.report["history"]] == [h["loss"] for h in full.report["history"]]


def test_a_different_config_in_the_same_output_is_refused(triplets, tmp_path):
    from tasks.training.job import TrainingConflict

    out = str(tmp_path / "run")
    run_training(config("local", triplets[0], out, epochs=1, batch_size=8))
    with pytest.raises(TrainingConflict, match="another configuration"):
        run_training(config("local", triplets[0], out, epochs=1, batch_size=8, seed=5))
    with pytest.raises(TrainingConflict, match="no run to continue"):
        run_training(config("local", triplets[0], str(tmp_path / "fresh"), epochs=1, batch_size=8), resume=True)


def test_converted_official_weights_train_a_step_without_missing_keys(triplets, tmp_path):
    from tests.model.test_convert import INJECT, official_checkpoint

    pipe = tiny_cnc_pipeline()
    pipe.register_modules(local_fuser=LocalFuser.from_unet(pipe.unet, inject_channels=INJECT))
    folder = tmp_path / "official-layout"
    pipe.save_pretrained(folder)
    ckpt = tmp_path / "cnc_v1.safetensors"
    save_file(official_checkpoint(), str(ckpt))
    cfg = config("full", triplets[0], str(tmp_path / "out"), init=str(folder), init_weights=str(ckpt), epochs=1,
                 batch_size=8)
    start = start_pipeline(cfg)
    expected = official_checkpoint()["global_adapter.ff1_fg.net.0.proj.weight"]
    assert torch.equal(start.global_fuser.fg_stream.ff1.net[0].proj.weight, expected)  # loaded, not fresh
    result = run_training(cfg)
    assert result.steps == 1
    trained = CnCPipeline.from_pretrained(result.model_url)
    assert trained.local_fuser.state_dict().keys() == start.local_fuser.state_dict().keys()
    assert trained.global_fuser.state_dict().keys() == start.global_fuser.state_dict().keys()


@pytest.mark.slow
def test_checkpoints_on_s3_and_a_second_invocation_continues(triplets, s3_bucket, tmp_path):
    from tests.fixtures.triplets import write_triplet_shards

    data_url = storage.join(s3_bucket, "triplets")
    write_triplet_shards(data_url, 8, shard_size=4)
    out = storage.join(s3_bucket, "runs", "local")
    seen = []

    def crash(info):
        seen.append(info["step"])
        if info["step"] == 3 and len(seen) == 3:
            raise Interrupt("node lost")

    cfg = config("local", data_url, out, on_step=crash)
    with pytest.raises(Interrupt):
        run_training(cfg)
    fs, path = storage.get_fs(out)
    assert fs.exists(f"{path}/checkpoints/checkpoint-00000002/local_fuser.safetensors")
    result = run_training(cfg)  # the same command again
    assert seen == [1, 2, 3, 3, 4]  # continued from step 2, not from the start
    assert result.steps == 4
    report = json.loads(storage.read_bytes(storage.join(out, "train_report.json")))
    assert report["steps"] == 4 and fs.exists(f"{path}/model/model_index.json")


def test_an_undecodable_sample_is_skipped_and_the_run_finishes(tmp_path):
    from tasks.shards import ShardWriter, shard_urls
    from tests.fixtures.triplets import sample_key, triplet_files

    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    tar, index = shard_urls(str(shards), 0)
    keys = [sample_key(i) for i in range(8)]
    with ShardWriter(tar, index) as writer:
        for i, key in enumerate(keys):
            files = triplet_files(i)
            if i == 5:
                files["depth_fg.png"] = b"not a png"
            writer.add_sample(key, f"s{i}", files)
        writer.commit()
    seen: list[str] = []
    result = run_training(config("local", str(tmp_path / "data"), str(tmp_path / "out"), epochs=1, batch_size=4,
                                 on_step=lambda info: seen.extend(info["keys"])))
    assert sorted(seen) == sorted(k for i, k in enumerate(keys) if i != 5)
    assert result.steps == 2 and storage.exists(result.report_url)
