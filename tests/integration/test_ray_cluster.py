"""Multi-node behaviour on ray.cluster_utils.Cluster: a node dies mid-run, nothing is lost or doubled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.sample_images import SAMPLE_PHOTOS, sample_photo_bytes

pytestmark = pytest.mark.slow
COPIES = 3


def test_killing_a_node_mid_run_accounts_for_every_input_exactly_once(tmp_path: Path):
    src = tmp_path / "photos"
    src.mkdir()
    for name in SAMPLE_PHOTOS:
        for i in range(COPIES):
            (src / f"{i}-{name}").write_bytes(sample_photo_bytes(name))
    n = len(SAMPLE_PHOTOS) * COPIES
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_kill_job.py")), str(src), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["killed_after"] == 1 and report["alive_nodes"] == 2  # the head and one worker are left
    assert (report["inputs"], report["samples"], report["rejects"], report["shards"]) == (n, n, 0, n)
    source_ids = []
    for index in sorted((out / "shards").glob("shard-*.parquet")):
        source_ids += pq.read_table(index).column("source_id").to_pylist()
    assert sorted(source_ids) == sorted(p.name for p in src.iterdir())  # each exactly once
    assert len(list((out / "shards").glob("shard-*.tar"))) == n
