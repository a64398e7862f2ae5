"""The flows' artifacts as a user sees them: read back from a real Prefect server's API.

The ingest and build-triplets flows run against Prefect's test server (a temporary SQLite
database behind a real API); their summary, reject and stage artifacts are read through the
Prefect client and compared with what the run really did (files written, shards, rejects.parquet).
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tasks.shards import iter_tar_samples

pytestmark = pytest.mark.slow
SIZE = 64
SHARD_SIZE = 4
SOURCES = len(SAMPLE_PHOTOS) + 2  # the photos, an all-black frame (a triplet reject), a broken file (an ingest reject)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts") / "photos"
    write_sample_folder(str(root))
    Image.new("RGB", (200, 150), "black").save(root / "all-black.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    assert len([p for p in root.iterdir() if p.suffix != ".txt"]) == SOURCES
    return root


def artifacts_of(run_id) -> dict[str, object]:
    """key -> artifact of one flow run, through the API."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    only_this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=only_this_run)
    by_key = {a.key: a for a in found}
    assert len(by_key) == len(found), [a.key for a in found]  # one of each
    return by_key


def summary(artifact) -> dict[str, str]:
    """The ``| what | value |`` rows of a summary artifact."""
    assert artifact.type == "markdown"
    rows = {}
    for line in artifact.data.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] not in ("what", "---"):
            rows[cells[0]] = cells[1]
    return rows


def table(artifact) -> list[dict]:
    assert artifact.type == "table"
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def assert_rate(rows: dict[str, str], inputs: int, wall: float) -> None:
    """The throughput is positive and is ``inputs / seconds``, both as printed (rounded to 0.1 s
    and 0.01 /s); the seconds are no more than the flow run took."""
    seconds, rate = float(rows["seconds"]), float(rows["inputs/s"])
    assert 0 <= seconds <= wall + 0.05 and rate > 0
    assert inputs / (seconds + 0.05) - 0.005 <= rate <= inputs / max(seconds - 0.05, 1e-9) + 0.005, (rate, seconds)


def run_flow(fn, params):
    t0 = time.perf_counter()
    state = fn(params, return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_completed(), state
    return state.state_details.flow_run_id, wall


def test_ingest_artifacts_report_the_real_counts_and_throughput(prefect_api, ray_local, photos, tmp_path):
    from flows.ingest_flow import ingest
    from flows.params import IngestParams

    out = tmp_path / "ingest"
    run_id, wall = run_flow(ingest, IngestParams(source=str(photos), out=str(out), size=SIZE, shard_size=SHARD_SIZE))
    found = artifacts_of(run_id)
    assert set(found) == {"ingest-summary", "ingest-rejects"}

    rows = summary(found["ingest-summary"])
    shards = sorted((out / "shards").glob("*.tar"))
    samples = sum(1 for u in shards for _ in iter_tar_samples(str(u)))
    assert samples == SOURCES - 1  # everything but the broken file
    assert {k: int(rows[k]) for k in ("inputs", "samples", "rejects", "shards")} == {
        "inputs": SOURCES, "samples": samples, "rejects": 1, "shards": len(shards)}
    assert len(shards) == -(-SOURCES // SHARD_SIZE)
    assert int(rows["inputs this run"]) == SOURCES
    assert_rate(rows, SOURCES, wall)
    # a re-run of the finished output writes nothing: its throughput counts nothing either
    again, _ = run_flow(ingest, IngestParams(source=str(photos), out=str(out), size=SIZE, shard_size=SHARD_SIZE))
    rerun = summary(artifacts_of(again)["ingest-summary"])
    assert int(rerun["inputs"]) == SOURCES and int(rerun["inputs this run"]) == 0 and rerun["inputs/s"] == "0.00"

    reasons = Counter(r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist())
    assert {r["reason"]: r["count"] for r in table(found["ingest-rejects"])} == dict(reasons)
    assert sum(reasons.values()) == 1


def test_build_triplets_artifacts_report_the_real_counts_and_throughput(prefect_api, ray_local, photos, tmp_path):
    from flows.params import BuildTripletsParams
    from flows.triplets_flow import build_triplets

    out = tmp_path / "build"
    params = BuildTripletsParams(source=str(photos), out=str(out), size=SIZE, shard_size=SHARD_SIZE,
                                 inpaint_steps=2, stages={"inpaint": {"batch_size": 4}})
    run_id, wall = run_flow(build_triplets, params)
    found = artifacts_of(run_id)
    assert set(found) == {"build-triplets-summary", "build-triplets-rejects", "build-triplets-stages",
                          "build-triplets-preview"}

    rows = summary(found["build-triplets-summary"])
    shards = sorted((out / "triplets" / "shards").glob("*.tar"))
    triplets = sum(1 for u in shards for _ in iter_tar_samples(str(u)))
    rejects = pq.read_table(out / "triplets" / "rejects.parquet").to_pylist()
    reasons = Counter(r["reason"] for r in rejects)
    assert reasons["blank_image"] == 1 and sum(n for r, n in reasons.items() if r.startswith("ingest:")) == 1
    assert triplets + len(rejects) == SOURCES and triplets > 0
    assert {k: int(rows[k]) for k in ("sources", "triplets", "rejects", "shards")} == {
        "sources": SOURCES, "triplets": triplets, "rejects": len(rejects), "shards": len(shards)}
    assert int(rows["sources this run"]) == SOURCES
    assert_rate(rows, SOURCES, wall)
    assert {r["reason"]: r["count"] for r in table(found["build-triplets-rejects"])} == dict(reasons)

    # per-stage model time: every model stage ran and its throughput is the samples over its seconds
    stages = {r["stage"]: r for r in table(found["build-triplets-stages"])}
    assert {"saliency", "inpaint", "depth"} <= set(stages)
    ingested = SOURCES - 1
    for name in ("saliency", "inpaint", "depth"):
        seconds, rate = stages[name]["seconds"], stages[name]["samples/s"]
        assert 0 < seconds <= wall and rate > 0
        # printed rounded: seconds to 0.001, the rate to 0.01
        assert abs(rate - ingested / seconds) <= 0.005 + ingested * 0.0005 / (seconds - 0.0005) ** 2, (name, rate)
    preview = found["build-triplets-preview"].data
    assert str(out / "triplets" / "preview.png") in preview
    assert Image.open(io.BytesIO((out / "triplets" / "preview.png").read_bytes())).size[0] > 0
