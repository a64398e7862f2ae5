"""The triplet stages' Ray custom metrics reach the node's Prometheus endpoint with the right values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("stage_metrics_job.py")
EXPECTED = [f"ray_cnc_triplets_{name},stage=mask_filter" for name in (
    "samples_total", "batch_seconds_count", "in_flight_batches", "samples_per_second")]


def test_stage_counters_and_gauges_are_scraped_from_prometheus():
    proc = subprocess.run([sys.executable, str(JOB)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1][len("RESULT "):])
    assert report["rejects"] == ["", "", "no_salient_object", "blank_image"]
    m = report["metrics"]
    # On a miss, show what the endpoint gave (and how long the job waited) rather than a bare KeyError.
    assert all(k in m for k in EXPECTED), report
    assert m["ray_cnc_triplets_samples_total,stage=mask_filter"] == 4
    assert m["ray_cnc_triplets_rejects_total,stage=mask_filter,reason=no_salient_object"] == 1
    assert m["ray_cnc_triplets_rejects_total,stage=mask_filter,reason=blank_image"] == 1
    assert m["ray_cnc_triplets_batch_seconds_count,stage=mask_filter"] == 1
    assert m["ray_cnc_triplets_in_flight_batches,stage=mask_filter"] == 0
    assert m["ray_cnc_triplets_samples_per_second,stage=mask_filter"] > 0
