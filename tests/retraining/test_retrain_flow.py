"""``retrain-cnc`` end to end on demo-sized triplets (tiny preset, in-process training, frozen set).

One registry lives through the module, as it does in production: the first run bootstraps (no
champion: the candidate is promoted), a rerun on the same data finds nothing new, the data grows
by a shard, a candidate that does not beat the champion by the margin is registered but not
promoted (the artifact says why), and a rerun with a margin it passes promotes that same version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import storage
from tasks.registry import Registry
from tasks.registry.store import manifest_hash
from tasks.shards import ShardWriter, shard_urls
from tests.fixtures.triplets import sample_key, triplet_files

pytestmark = pytest.mark.slow


def write_shard(root: Path, shard: int, indices: range) -> dict:
    """One triplet shard (build-triplets layout) of the synthetic samples ``indices``."""
    tar, index = shard_urls(str(root / "shards"), shard)
    storage.makedirs(str(root / "shards"))
    with ShardWriter(tar, index) as writer:
        for i in indices:
            writer.add_sample(sample_key(i), f"synthetic-{i}", triplet_files(i, 64), caption=f"object {i}")
        writer.commit()
    return {"tar": f"shards/{Path(tar).name}", "triplets": len(indices), "rejects": 0}


def write_manifest(root: Path, shards: list[dict]) -> None:
    n = sum(s["triplets"] for s in shards)
    storage.write_json(str(root / "manifest.json"), {"kind": "cnc-triplets", "counts": {"triplets": n, "rejects": 0},
                                                     "shards": shards, "failed_shards": []})


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Triplets in two shards (the build-triplets --out layout), a held-out set, an empty registry."""
    root = tmp_path_factory.mktemp("retrain")
    data = root / "build" / "triplets"
    shards = [write_shard(data, 0, range(0, 4)), write_shard(data, 1, range(4, 8))]
    write_manifest(data, shards)
    held_out = root / "held-out"
    write_manifest(held_out, [write_shard(held_out, 0, range(100, 104))])
    return {"root": root, "data": data, "shards": shards, "held_out": held_out, "registry": str(root / "registry")}


def params(loop, **over):
    from flows.retrain_params import RetrainParams

    base = dict(data=str(loop["root"] / "build"), registry=loop["registry"], work=str(loop["root"] / "work"),
                eval_triplets=str(loop["held_out"]), init="tiny", executor="local", epochs=1, batch_size=8,
                lr=1e-3, val_fraction=0.0, eval_settings=["both"], eval_steps=2, preset="tiny", splits=2,
                generate_executor="local", eval_executor="local", metric="both.fid")
    return RetrainParams(**{**base, **over})


@pytest.fixture(autouse=True)
def _prefect(monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine


def test_1_no_champion_the_first_candidate_is_promoted(loop):
    from flows.retrain_flow import retrain_cnc

    result = retrain_cnc(params(loop))
    reg = Registry(loop["registry"])
    (version,) = reg.versions()
    assert result["action"] == "promoted" and result["previous_champion"] is None
    assert reg.champion().version == version.version == result["candidate"]
    assert "no champion yet" in result["reason"]
    manifest = json.loads((loop["data"] / "manifest.json").read_text())
    assert version.data_manifest_hash == manifest_hash(manifest)
    assert version.metrics["both.images"] == 4 and "both.fid" in version.metrics
    assert (Path(version.pipeline_url) / "model_index.json").exists()


def test_2_the_same_data_again_is_up_to_date(loop):
    from flows.retrain_flow import retrain_cnc

    before = Registry(loop["registry"]).champion().version
    result = retrain_cnc(params(loop))
    assert result["action"] == "up-to-date" and not result["promoted"]
    assert "nothing new" in result["reason"]
    assert [v.version for v in Registry(loop["registry"]).versions()] == [before]
    from typer.testing import CliRunner

    from flows.cli import app

    p = params(loop)
    args = ["retrain", "--data", p.data, "--registry", p.registry, "--work", p.work, "--eval-triplets",
            p.eval_triplets, "--init", "tiny", "--preset", "tiny", "--set", 'eval_settings=["both"]']
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "up-to-date" in result.output and f"champion: {before}" in result.output
    bad = CliRunner().invoke(app, [*args, "--metric", "exemplar.fid"])
    assert bad.exit_code == 2 and "must be <setting>.<name>" in bad.output


def test_3_a_candidate_short_of_the_margin_is_kept_out(loop):
    """New shard appended; the candidate must beat the champion by 1e9: registered, not promoted."""
    from prefect.artifacts import Artifact

    from flows.retrain_flow import retrain_cnc

    loop["shards"].append(write_shard(loop["data"], 2, range(8, 12)))
    write_manifest(loop["data"], loop["shards"])
    reg = Registry(loop["registry"])
    champion = reg.champion().version
    result = retrain_cnc(params(loop, margin=1e9))
    assert result["action"] == "kept" and result["champion"] == champion == reg.champion().version
    assert result["new_shards"] == ["shards/shard-000002.tar"]
    assert "<= margin 1e+09: champion kept" in result["reason"]
    assert [v.version for v in reg.versions()] == [champion, result["candidate"]]  # registered all the same
    first = result["table"][0]
    assert first["metric"] == "both.fid" and first["decides"] and first["delta"] not in (None, 0)
    decision = Artifact.get("retrain-cnc-decision")
    assert "champion kept" in decision.data and result["candidate"] in decision.data
    loop["kept"] = result


def test_4_a_candidate_beyond_the_margin_becomes_champion(loop):
    """The same candidate (found again: no training, no scoring, no second version) against a
    margin it passes: the direction in which the candidate of test 3 won."""
    from flows.retrain_flow import retrain_cnc

    kept = loop["kept"]
    fid = kept["table"][0]
    candidate_lower = fid["candidate"] < fid["champion"]
    reg = Registry(loop["registry"])
    previous = reg.champion().version
    result = retrain_cnc(params(loop, margin=abs(fid["delta"]) / 2, higher_is_better=not candidate_lower))
    assert result["action"] == "promoted" and result["candidate"] == kept["candidate"]
    assert reg.champion().version == kept["candidate"] and result["previous_champion"] == previous
    assert len(reg.versions()) == 2
    assert [e.version for e in reg.history()] == [previous, kept["candidate"]]
    assert "> margin" in reg.history()[-1].reason
    assert retrain_cnc(params(loop))["action"] == "up-to-date"  # the new champion saw this data
