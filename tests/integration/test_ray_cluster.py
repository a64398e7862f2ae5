"""Multi-node behaviour on ray.cluster_utils.Cluster: a node dies mid-run, nothing is lost or doubled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.ingest import run_ingest
from tasks.sample_images import SAMPLE_PHOTOS, sample_photo_bytes

pytestmark = pytest.mark.slow
COPIES = 3
JOB = Path(__file__).with_name("cluster_kill_job.py")


def photo_copies(folder: Path, copies: int) -> list[str]:
    folder.mkdir()
    for name in SAMPLE_PHOTOS:
        for i in range(copies):
            (folder / f"{i}-{name}").write_bytes(sample_photo_bytes(name))
    return sorted(p.name for p in folder.iterdir())


def run_job(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def source_ids(shards: Path) -> list[str]:
    ids: list[str] = []
    for index in sorted(shards.glob("shard-*.parquet")):
        ids += pq.read_table(index).column("source_id").to_pylist()
    return ids


def test_killing_a_node_mid_ingest_accounts_for_every_input_exactly_once(tmp_path: Path):
    names = photo_copies(tmp_path / "photos", COPIES)
    n = len(names)
    out = tmp_path / "out"
    report = run_job("ingest", str(tmp_path / "photos"), str(out))
    # the victim died holding an uncommitted shard; the cluster saw it die (head + one worker left)
    assert report["lost"] and ".tmp-" in report["lost"], report
    assert report["alive_nodes"] == 2, report
    assert (report["inputs"], report["samples"], report["rejects"], report["shards"]) == (n, n, 0, n)
    assert sorted(source_ids(out / "shards")) == names  # each exactly once
    assert len(list((out / "shards").glob("shard-*.tar"))) == n
    # the shard the victim was writing when it died was redone elsewhere
    lost_shard = report["lost"].split(".tmp-")[0].lstrip(".")
    assert (out / "shards" / lost_shard).is_file(), lost_shard


def test_killing_a_node_during_the_model_stages_accounts_for_every_source(tmp_path: Path):
    names = photo_copies(tmp_path / "photos", 2)
    ingest = tmp_path / "ingest"
    run_ingest("folder", str(tmp_path / "photos"), str(ingest), size=64, shard_size=4, executor="local")
    out = tmp_path / "triplets"
    report = run_job("triplets", str(ingest), str(out))
    assert report["lost"], report  # the victim died running a model stage's task or actor method
    assert report["alive_nodes"] == 2, report
    assert report["sources"] == len(names) == report["triplets"] + report["rejects"]
    assert sorted(source_ids(out / "shards")) == names  # each exactly once, as a triplet or a reject
    assert list((out / "_staging").rglob("*.tar")) == []  # every staged part was assembled and removed
