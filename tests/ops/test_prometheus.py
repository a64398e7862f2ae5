"""A real Prometheus with the project's configuration (infra/local/monitoring.sh) scrapes the
pipeline's metrics from a Ray head started as the local stack starts it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tasks.ray_jobs import JobSpec, client, find_or_submit, stop
from tests.ops.conftest import ROOT, wait_for
from tests.ports import listening_port

pytestmark = pytest.mark.slow


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(locked_head, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    # port 0: Prometheus binds a free port itself (nothing can take it between choosing and binding)
    env = {**os.environ, "PROMETHEUS_BIN": binary, "GRAFANA_BIN": "none", "PROMETHEUS_PORT": "0",
           "RAY_TEMP_DIR": str(locked_head.temp_dir), "CNC_MONITORING_DIR": str(tmp_path / "mon")}
    subprocess.run(["bash", str(ROOT / "infra/local/monitoring.sh")], env=env, check=True, timeout=60,
                   capture_output=True)
    pid = int((tmp_path / "mon" / "prometheus.pid").read_text())
    try:
        port = wait_for(lambda: listening_port(pid), 60, "Prometheus listening",
                        explain=lambda: (tmp_path / "mon" / "prometheus.log").read_text()[-2000:])
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=5).status == 200, 60, "Prometheus ready")
        yield base
    finally:
        os.kill(pid, signal.SIGTERM)


def diagnose(base: str, head, jobs, sid: str) -> str:
    """What each link of the chain shows, for a failure message: job, node endpoint, targets."""
    parts = [f"job {jobs.get_job_status(sid)}: {jobs.get_job_logs(sid)[-1500:]}"]
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=10).read().decode()
        parts.append("node endpoint: " + " | ".join(ln for ln in text.splitlines() if "cnc_" in ln)[:1500])
    except OSError as exc:
        parts.append(f"node endpoint: {exc!r}")
    targets = json.loads(urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10).read())
    parts.append("targets: " + json.dumps([(t["scrapeUrl"], t["health"], t.get("lastError"))
                                           for t in targets["data"]["activeTargets"]]))
    return "\n".join(parts)


def test_prometheus_scrapes_the_pipeline_metrics_from_the_local_stack(locked_head, prometheus, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", locked_head.token)
    jobs = client(locked_head.dashboard_url)
    spec = JobSpec(entrypoint=shlex.join([sys.executable, str(Path(__file__).with_name("metrics_job.py"))]),
                   key=uuid.uuid4().hex[:8], name="metrics", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    sid, _ = find_or_submit(jobs, spec)
    try:
        samples = wait_for(lambda: query(prometheus, 'ray_cnc_triplets_samples_total{stage="mask_filter"}'), 150,
                           "the stage's samples counter in Prometheus", interval=2,
                           explain=lambda: diagnose(prometheus, locked_head, jobs, sid))
        assert sum(float(s["value"][1]) for s in samples) == 4
        rejects = wait_for(lambda: query(prometheus, "sum by (reason) (ray_cnc_triplets_rejects_total)"), 60,
                           "the rejects counter in Prometheus", interval=2)
        assert {r["metric"]["reason"]: float(r["value"][1]) for r in rejects} == {"no_salient_object": 1,
                                                                               "blank_image": 1}
        targets = json.loads(urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=10).read())
        scraped = {t["scrapePool"] for t in targets["data"]["activeTargets"] if t["health"] == "up"}
        assert scraped == {"ray"}
    finally:
        stop(jobs, sid)
