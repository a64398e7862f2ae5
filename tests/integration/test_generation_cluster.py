"""generate-batch on a simulated cluster: a node killed mid-job still ends with every row exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("generation_kill_job.py")


def test_killing_a_node_mid_generation_keeps_every_row_exactly_once(tmp_path: Path):
    rows = 12
    table = tmp_path / "jobs.jsonl"
    table.write_text("\n".join(json.dumps({"id": f"r{i:02d}", "prompt": f"prompt {i % 3}", "seed": i, "steps": 3})
                               for i in range(rows)) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(JOB), str(table), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    report = json.loads(line[len("RESULT "):])
    assert report["killed"] and (report["rows"], report["images"], report["rejects"]) == (rows, rows, 0)
    ids = []
    for index in sorted((out / "shards").glob("shard-*.parquet")):
        ids += pq.read_table(index).column("source_id").to_pylist()
    assert sorted(ids) == [f"r{i:02d}" for i in range(rows)]  # every row once: none lost, none twice
    assert len(list((out / "shards").glob("shard-*.tar"))) == rows // 2
