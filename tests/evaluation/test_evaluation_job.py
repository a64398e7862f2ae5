"""Evaluation: per-shard statistics merge to the same metrics however the images are sharded."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from tasks import storage
from tasks.evaluation.job import EvaluationConfig, EvaluationConflict, run_evaluation
from tasks.shards import ShardWriter, shard_urls


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(seed: int, n: int, bright: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 120, size=(40, 40, 3), dtype=np.uint8)
        if bright:
            img[:, 20:] += 120  # bright right half: a distribution the left-dark set does not have
        out.append(img)
    return out


def write_set(url: str, images: list[np.ndarray], per_shard: int, prompts: list[str] | None = None,
              corrupt: int | None = None) -> str:
    for s, start in enumerate(range(0, len(images), per_shard)):
        with ShardWriter(*shard_urls(url, s)) as writer:
            for i in range(start, min(start + per_shard, len(images))):
                files = {"png": b"\x89PNG broken" if i == corrupt else _png(images[i])}
                if prompts:
                    files["json"] = json.dumps({"id": f"img{i:03d}", "prompt": prompts[i]}).encode()
                writer.add_sample(f"img{i:03d}", f"img{i:03d}", files)
            writer.commit()
    return url


@pytest.fixture
def sets(tmp_path):
    real = _images(0, 24, bright=False)
    gen = _images(1, 24, bright=True)
    prompts = ["a red cube" if i % 2 else "a blue ball on the left" for i in range(24)]
    root = str(tmp_path)
    return {
        "real": write_set(f"{root}/real", real, 8),
        "same": write_set(f"{root}/same", real, 24, prompts),  # the real images, one shard
        "gen3": write_set(f"{root}/gen3", gen, 8, prompts),
        "gen1": write_set(f"{root}/gen1", gen, 24, prompts),
        "bad": write_set(f"{root}/bad", gen, 8, prompts, corrupt=5),
        "root": root,
    }


def test_metrics_do_not_depend_on_sharding_and_rerun_measures_nothing(sets):
    cfg = EvaluationConfig(real=sets["real"], settings={"same": sets["same"], "gen3": sets["gen3"],
                                                        "gen1": sets["gen1"], "bad": sets["bad"]},
                           out=f"{sets['root']}/eval", executor="local", splits=3, batch_size=5)
    metrics = run_evaluation(cfg)
    s = metrics["settings"]
    assert metrics["real_images"] == 24 and metrics["plumbing"] is True
    assert abs(s["same"]["fid"]) < 1e-6  # a set against itself
    assert s["gen3"]["fid"] > 1e-3
    for key in ("fid", "inception_score", "inception_score_std", "clip_score"):
        assert s["gen3"][key] == pytest.approx(s["gen1"][key], rel=1e-6), key  # 3 shards == 1 shard
    assert s["gen1"]["images"] == 24 and s["bad"]["images"] == 23 and s["bad"]["unreadable"] == 1
    assert not math.isclose(s["bad"]["fid"], s["gen1"]["fid"], rel_tol=1e-9)
    assert 0 < s["gen1"]["clip_score"] <= 100
    stored = storage.read_json(metrics["metrics_url"])
    assert stored["settings"]["gen1"]["fid"] == pytest.approx(s["gen1"]["fid"])
    assert Image.open(metrics["figure_url"]).size[0] > 300
    again = run_evaluation(cfg)
    assert again["shards_measured"] == 0 and metrics["shards_measured"] == 3 + 1 + 3 + 1 + 3
    assert json.dumps(again["settings"], sort_keys=True) == json.dumps(s, sort_keys=True)  # NaN-safe
    with pytest.raises(EvaluationConflict, match="splits"):
        run_evaluation(EvaluationConfig(**{**cfg.__dict__, "splits": 4}))


def test_missing_set_and_missing_inception_weights_are_named(sets, tmp_path):
    with pytest.raises(FileNotFoundError, match="gen9"):
        run_evaluation(EvaluationConfig(real=sets["real"], settings={"gen9": f"{sets['root']}/nothing"},
                                        out=str(tmp_path / "e1"), executor="local"))
    with pytest.raises(FileNotFoundError, match="pt_inception.pth"):
        run_evaluation(EvaluationConfig(real=sets["real"], settings={"g": sets["gen1"]}, out=str(tmp_path / "e2"),
                                        executor="local", feature_net=str(tmp_path / "pt_inception.pth")))


@pytest.mark.slow
def test_ray_actor_pool_gives_the_local_numbers(sets, tmp_path):
    import ray

    if not ray.is_initialized():  # a new local Ray, never another run's cluster on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = {"gen3": sets["gen3"], "bad": sets["bad"]}
    local = run_evaluation(EvaluationConfig(real=sets["real"], settings=settings, out=str(tmp_path / "l"),
                                            executor="local", splits=3))
    ray_run = run_evaluation(EvaluationConfig(real=sets["real"], settings=settings, out=str(tmp_path / "r"),
                                              executor="ray", actors=2, splits=3))
    for name in settings:
        for key in ("fid", "inception_score", "clip_score", "images"):
            assert ray_run["settings"][name][key] == pytest.approx(local["settings"][name][key], rel=1e-9)


def test_condition_fidelity_follows_the_rows_conditions(tmp_path):
    """An image that IS its fg exemplar (mask everywhere) has fg exemplar similarity 1; rows without
    conditions contribute nothing; depth errors are mean absolute errors in [0, 1]."""
    rng = np.random.default_rng(3)
    cond = tmp_path / "cond"
    cond.mkdir()
    fg = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    other = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    Image.fromarray(fg).save(cond / "fg.png")
    Image.fromarray(other).save(cond / "other.png")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(cond / "all.png")
    depth = np.zeros((40, 40), np.uint16)
    depth[10:30, 5:20] = 60000
    Image.fromarray(depth).save(cond / "depth.png")
    rows = [{"id": "same", "prompt": "p", "seed": 0, "fg_exemplar": "fg.png", "mask": "all.png"},
            {"id": "diff", "prompt": "p", "seed": 0, "fg_exemplar": "other.png", "mask": "all.png"},
            {"id": "depth", "prompt": "p", "seed": 0, "fg_depth": "depth.png", "bg_depth": "depth.png"},
            {"id": "plain", "prompt": "p", "seed": 0}]
    url = str(tmp_path / "gen")
    with ShardWriter(*shard_urls(url, 0)) as writer:
        for row in rows:
            writer.add_sample(row["id"], row["id"], {"png": _png(fg), "json": json.dumps(row).encode()})
        writer.commit()
    real = write_set(str(tmp_path / "real"), _images(0, 4, bright=False), 4)
    metrics = run_evaluation(EvaluationConfig(real=real, settings={"g": url}, out=str(tmp_path / "e"),
                                              executor="local", splits=2, depth="tiny",
                                              condition_root=str(cond)))["settings"]["g"]
    from tasks.evaluation.measure import ShardMeasurer

    measurer = ShardMeasurer(depth="tiny", condition_root=str(cond), splits=2)
    same = measurer.fidelity.measure(fg, rows[0])
    diff = measurer.fidelity.measure(fg, rows[1])
    assert same["exemplar_fg_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert diff["exemplar_fg_similarity"] < same["exemplar_fg_similarity"] - 1e-3
    assert set(measurer.fidelity.measure(fg, rows[2])) == {"depth_fg_error", "depth_bg_error"}
    assert measurer.fidelity.measure(fg, rows[3]) == {}
    assert metrics["exemplar_fg_similarity"] == pytest.approx(
        (same["exemplar_fg_similarity"] + diff["exemplar_fg_similarity"]) / 2, rel=1e-6)
    assert 0 <= metrics["depth_fg_error"] <= 1 and 0 <= metrics["depth_bg_error"] <= 1
    assert math.isnan(metrics["exemplar_bg_similarity"])  # the mask covers everything: no background
