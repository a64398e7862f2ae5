"""End to end through Prefect as a user runs it: server, work pool, deploy, worker, deployment run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tests.integration.prefect_stack import PrefectStack

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
