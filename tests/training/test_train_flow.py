"""``train-cnc``: prefect.yaml's deployments match the flow's parameters and the training config;
the flow runs a stage (in-process executor) and returns where its outputs are."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.train_flow import TrainParams, base_config
from tasks.training.job import STAGE_ORDER

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["local", "cluster"])
def test_train_deployments_are_valid_configs(name):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == name and d["entrypoint"].endswith(":train_cnc")]
    params = TrainParams(**dep["parameters"]["params"])
    cfg = base_config(params)
    for stage in STAGE_ORDER:
        cfg.stage = stage
        cfg.validate()
    if name == "cluster":
        assert (params.init, params.gpus_per_worker, params.batch_size) == ("sd15", 1, 32)
        assert params.data.startswith("s3://") and params.out.startswith("s3://")


@pytest.mark.slow
def test_the_flow_trains_a_stage_and_reports_its_outputs(triplets, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.train_flow import train_cnc

    params = TrainParams(stage="local", data=triplets[0], out=str(tmp_path / "run"), executor="local", epochs=1,
                         batch_size=8, val_fraction=0.0)
    (result,) = train_cnc(params)
    assert result["stage"] == "local" and result["steps"] == 1 and not result["skipped"]
    assert Path(result["loss_curve_url"]).read_bytes().startswith(b"\x89PNG")
    assert (Path(result["model_url"]) / "model_index.json").exists()
    (again,) = train_cnc(params)  # a re-run of a finished flow returns at once
    assert again["skipped"]
