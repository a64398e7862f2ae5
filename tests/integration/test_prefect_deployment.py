"""End to end through Prefect as a user runs it: server, work pool, deploy, worker, deployment run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tests.integration.prefect_stack import FINAL_STATES, PrefectStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    stack = PrefectStack(tmp_path_factory.mktemp("prefect-home")).start()
    stack.start_worker()
    yield stack
    stack.stop()


def test_ingest_deployment_runs_through_a_worker(prefect_stack, tmp_path: Path):
    photos = tmp_path / "photos"
    write_sample_folder(str(photos))
    out = tmp_path / "out"
    prefect_stack.deploy("ingest/local")
    output = prefect_stack.run_deployment("ingest/local", {"params": {
        "source_format": "folder", "source": str(photos), "out": str(out), "size": 64, "shard_size": 4}})
    assert "Completed" in output, output + prefect_stack.log("worker.log")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == len(SAMPLE_PHOTOS)
    assert manifest["counts"]["rejects"] == 0


def test_build_triplets_deployment_survives_a_cancelled_run(prefect_stack, tmp_path: Path):
    """Cancel the first run as soon as a triplet shard is final; running the deployment again
    finishes the job without rewriting the shards that were already final."""
    import time

    from tasks.sample_images import sample_photo_bytes

    photos = tmp_path / "photos"
    photos.mkdir()
    copies = 6
    for name in SAMPLE_PHOTOS:
        for i in range(copies):
            (photos / f"{i}-{name}").write_bytes(sample_photo_bytes(name))
    out = tmp_path / "out"
    params = {"params": {"source_format": "folder", "source": str(photos), "out": str(out), "size": 64,
                         "shard_size": 2, "inpaint_steps": 150}}  # long enough to cancel mid-way
    params["params"]["executor"] = "ray"  # auto would pick a process pool: this test is about a flow that started Ray
    prefect_stack.deploy("build-triplets/local")
    run_id = prefect_stack.start_deployment("build-triplets/local", params)
    shards = out / "triplets" / "shards"
    deadline = time.time() + 400
    while not list(shards.glob("shard-*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    prefect_stack.cancel(run_id)  # fails loudly if the run had already finished
    # snapshot only once the API says the run is Cancelled (its process is gone, nothing writes any more)
    run = prefect_stack.wait_for_state(run_id, FINAL_STATES)
    # Cancelling, then Cancelled, never Crashed on the way: the flow process keeps Prefect's SIGTERM bridge
    # although it started Ray (ray.init installs its own handler, which turned the kill into SystemExit(15):
    # the engine recorded a crash before the worker set Cancelled; tasks/ray_runtime.py)
    history = prefect_stack.state_history(run_id)
    assert "CANCELLING" in history and "CRASHED" not in history, history
    assert run["state_type"] == "CANCELLED", run["state_type"] + prefect_stack.log("worker.log")
    final_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*")}
    n = len(SAMPLE_PHOTOS) * copies
    assert final_before, prefect_stack.log("worker.log")
    assert len([name for name in final_before if name.endswith(".tar")]) < n // 2  # cancelled mid-way
    assert not (out / "triplets" / "manifest.json").exists()
    output = prefect_stack.run_deployment("build-triplets/local", params)
    assert "Completed" in output, output + prefect_stack.log("worker.log")
    manifest = json.loads((out / "triplets" / "manifest.json").read_text())
    assert manifest["counts"]["sources"] == n
    assert manifest["counts"]["triplets"] + manifest["counts"]["rejects"] == n
    assert len(list(shards.glob("shard-*.tar"))) == n // 2
    assert {name: (shards / name).stat().st_mtime_ns for name in final_before} == final_before


def test_generate_evaluate_and_sweep_deployments_complete(prefect_stack, tmp_path: Path):
    """generate-batch/local, evaluate-cnc/local and glod-sweep/local through the worker, on small inputs."""
    import yaml

    from tests.evaluation.test_evaluation_job import _images, write_set
    from tests.generation.test_sweep import SPEC_B

    table = tmp_path / "jobs.jsonl"
    table.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}", "seed": i, "steps": 1})
                               for i in range(3)) + "\n" + '{"id": "bad", "prompt": "x", "seed": 1, "colour": 1}\n')
    for name in ("generate-batch/local", "evaluate-cnc/local", "glod-sweep/local"):
        prefect_stack.deploy(name)
    out = tmp_path / "generated"
    output = prefect_stack.run_deployment("generate-batch/local", {"params": {
        "rows": str(table), "out": str(out), "model": "tiny", "shard_size": 2, "batch_size": 2}})
    assert "Completed" in output, output + prefect_stack.log("worker.log")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 3 and manifest["counts"]["rejects_by_reason"] == {"unknown_field": 1}

    real = write_set(str(tmp_path / "real"), _images(0, 6, bright=False), 3)
    settings = {"depth": str(out / "shards"), "exemplar": str(out / "shards"), "both": str(out / "shards")}
    output = prefect_stack.run_deployment("evaluate-cnc/local", {"params": {
        "real": real, "settings": settings, "out": str(tmp_path / "eval"), "preset": "tiny", "splits": 2}})
    assert "Completed" in output, output + prefect_stack.log("worker.log")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["plumbing"] is True and metrics["settings"]["both"]["images"] == 3
    assert metrics["settings"]["depth"]["fid"] == metrics["settings"]["both"]["fid"]  # the same set twice

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"model": "tiny", "steps": 1, "specs": {"cat": SPEC_B},
                                     "grid": {"local_weight": [2.0, 6.0]}}))
    output = prefect_stack.run_deployment("glod-sweep/local", {"params": {
        "sweep": str(sweep), "out": str(tmp_path / "sweep"), "shard_size": 4}})
    assert "Completed" in output, output + prefect_stack.log("worker.log")
    assert json.loads((tmp_path / "sweep" / "manifest.json").read_text())["counts"]["images"] == 2
    assert (tmp_path / "sweep" / "contact-cat.png").exists() and (tmp_path / "sweep" / "alignment.png").exists()
