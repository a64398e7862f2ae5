"""Training config tree and data plan: reference defaults, one-line errors, deterministic split, decoding."""

from __future__ import annotations

import numpy as np
import pytest

from cnc_model.cnc import training as cnc_training
from tasks.shards import ShardWriter, shard_urls
from tasks.training import data
from tasks.training.config import STAGES, DataConfig, ScalingSpec, full_stage, global_stage, local_stage, stage_config
from tests.fixtures.triplets import triplet_files


def test_stage_functions_give_the_reference_settings():
    assert STAGES == cnc_training.STAGES
    configs = {"local": local_stage(), "global": global_stage(), "full": full_stage()}
    assert {s: c.epochs for s, c in configs.items()} == {"local": 28, "global": 24, "full": 9}
    for stage, cfg in configs.items():
        assert cfg.stage == stage and cfg.optim.lr == 1e-5 and cfg.batch_size == 32
        assert cfg.text_dropout == cfg.condition_dropout == 0.1 and not cfg.encoder_grad
        assert cfg.optim.max_grad_norm is None and cfg.optim.warmup_steps == 0
    assert stage_config("local", epochs=2).epochs == 2


@pytest.mark.parametrize("change, message", [
    (dict(stage="everything"), "unknown stage"),
    (dict(batch_size=6, scaling=ScalingSpec(workers=4)), "not a multiple"),
    (dict(max_steps=0), "max-steps"),
    (dict(mixed_precision="fp8"), "mixed-precision"),
    (dict(scaling=ScalingSpec(workers=2, executor="local")), "local executor"),
])
def test_bad_configs_are_one_line_errors(change, message):
    cfg = stage_config("local", out="/tmp/x", data=DataConfig(url="/tmp/y"))
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)


def test_identity_ignores_what_may_change_on_resume():
    a = stage_config("local", out="o", data=DataConfig(url="d"))
    b = stage_config("local", out="o", data=DataConfig(url="d"), epochs=3, max_steps=7, scaling=ScalingSpec(workers=4))
    c = stage_config("local", out="o", data=DataConfig(url="d"), seed=1)
    assert a.identity() == b.identity() != c.identity()


def test_plan_counts_samples_splits_by_key_hash_and_pads_evenly(triplets):
    url, keys = triplets
    plan = data.plan_data(url, "full", 0.0, workers=3)
    assert (plan.train_keys, plan.val_keys) == (8, 0)  # the reject row is not a sample
    assert plan.pad == 1 and plan.rows_per_worker == 3 and plan.batches_per_epoch(2) == 2
    held = [k for k in keys if data.is_val(k, 0.4)]
    assert 0 < len(held) < len(keys)
    split = data.plan_data(url, "full", 0.4, workers=1)
    assert (split.train_keys, split.val_keys) == (len(keys) - len(held), len(held))
    rows = list(data.local_rows(split, None, 0.4, "val"))
    assert sorted(r["key"] for r in rows) == sorted(held)
    assert plan.fields == data.Fields(depth=True, exemplars=True, latents=False, clip=True)


def test_decoded_rows_keep_fg_and_bg_apart(triplets):
    url, keys = triplets
    plan = data.plan_data(url, "full", 0.0, workers=1)
    rows = {r["key"]: r for r in data.local_rows(plan, None, 0.0, "train")}
    even, odd = rows[keys[0]], rows[keys[1]]
    for row in (even, odd):
        assert row["fg_depth"].shape == (1, 64, 64) and 0 <= row["fg_depth"].min() and row["fg_depth"].max() <= 1
        assert np.all(row["fg_depth"][row["mask"] == 0] == 0)  # fg depth is black outside the object
        assert row["bg_depth"][0, :, -1].mean() > row["bg_depth"][0, :, 0].mean()  # bg ramp rises to the right
        assert row["pixels"].min() >= -1 and row["pixels"].max() <= 1
    half = 32
    assert even["mask"][0, :, :half].sum() > 0 and even["mask"][0, :, half:].sum() == 0  # even samples: left
    assert odd["mask"][0, :, half:].sum() > 0 and odd["mask"][0, :, :half].sum() == 0  # odd samples: right
    assert not np.allclose(even["clip_fg"], even["clip_bg"])


def test_shards_without_a_stage_field_are_a_one_line_error(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    tar, index = shard_urls(str(shards), 0)
    files = {k: v for k, v in triplet_files(0).items() if not k.startswith(("depth_", "clip_", "fg.", "bg."))}
    with ShardWriter(tar, index) as writer:
        writer.add_sample("k0", "s0", files)
        writer.commit()
    with pytest.raises(data.TrainingDataError, match="depth_fg.png, depth_bg.png needed by stage 'local'"):
        data.plan_data(str(tmp_path), "local", 0.0, 1)
    with pytest.raises(data.TrainingDataError, match="clip_fg.npy") as info:
        data.plan_data(str(tmp_path), "global", 0.0, 1)
    assert "\n" not in str(info.value)
    with pytest.raises(data.TrainingDataError, match="no triplet shards"):
        data.plan_data(str(tmp_path / "empty"), "local", 0.0, 1)
