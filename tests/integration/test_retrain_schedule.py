"""``retrain-cnc/local`` as an operator runs it: a real Prefect server, `prefect deploy` of the
deployment from prefect.yaml (its schedule shortened to an interval of a few seconds), a worker;
the schedule fires, the run trains on the triplets, scores on the frozen set and promotes the first
candidate; later scheduled runs find nothing new and leave the registry as it is."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tasks.registry import Registry
from tasks.registry.store import manifest_hash
from tests.integration.prefect_stack import REPO, PrefectStack
from tests.retraining.test_retrain_flow import write_manifest, write_shard

pytestmark = pytest.mark.slow


def test_the_scheduled_deployment_fires_and_promotes_the_first_candidate(tmp_path: Path):
    data = tmp_path / "build" / "triplets"
    write_manifest(data, [write_shard(data, 0, range(0, 4)), write_shard(data, 1, range(4, 8))])
    held_out = tmp_path / "held-out"
    write_manifest(held_out, [write_shard(held_out, 0, range(100, 104))])
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["entrypoint"] == "flows/retrain_flow.py:retrain_cnc"]
    registry = tmp_path / "registry"
    dep["parameters"]["params"].update(data=str(tmp_path / "build"), registry=str(registry),
                                       work=str(tmp_path / "work"), eval_triplets=str(held_out), batch_size=8,
                                       eval_steps=2)
    dep["schedules"] = [{"interval": 5, "slug": "retrain-cnc-test", "active": True}]
    dep["triggers"] = []
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({**spec, "deployments": [dep]}))

    stack = PrefectStack(tmp_path / "prefect-home")
    stack.env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"
    try:
        stack.start()
        stack.cli("deploy", "--prefect-file", str(prefect_file), "--name", "retrain-cnc/local")
        stack.start_worker()
        deadline = time.time() + 400
        champion = None
        while champion is None and time.time() < deadline:  # the condition itself, with a deadline
            time.sleep(1)
            champion = Registry(str(registry)).champion() if (registry / "champion.json").exists() else None
        assert champion is not None, stack.log("worker.log") + stack.log("server.log")
        manifest = json.loads((data / "manifest.json").read_text())
        assert champion.data_manifest_hash == manifest_hash(manifest)
        assert "retrain-cnc: full from tiny" in champion.note
        runs = json.loads(stack.cli("flow-run", "ls", "--flow-name", "retrain-cnc", "--output", "json").stdout)
        assert runs and all(r["deployment_id"] for r in runs)  # made by the deployment's schedule
    finally:
        stack.stop()
    assert len(Registry(str(registry)).versions()) == 1  # later runs: up to date, nothing registered
