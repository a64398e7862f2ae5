"""The local stack's Ray refuses work without its token and listens on loopback only."""

from __future__ import annotations

import json
import socket

import pytest

from tests.ops.conftest import http_status

pytestmark = pytest.mark.slow


def routable_ip() -> str | None:
    """This machine's address as other machines see it (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_the_local_stack_ray_refuses_a_job_without_the_token(locked_head):
    jobs = f"{locked_head.dashboard_url}/api/jobs/"
    body = json.dumps({"entrypoint": "echo should-never-run"}).encode()
    assert http_status(jobs, data=body) == 401
    assert http_status(jobs, {"Authorization": "Bearer not-the-token"}, data=body) in (401, 403)
    assert http_status(jobs) == 401  # not even the list of jobs
    assert http_status(jobs, locked_head.headers()) == 200
    listed = []
    import urllib.request

    req = urllib.request.Request(jobs, headers=locked_head.headers())
    with urllib.request.urlopen(req, timeout=10) as resp:
        listed = json.loads(resp.read())
    assert all("should-never-run" not in j.get("entrypoint", "") for j in listed)


def test_gcs_dashboard_and_metrics_listen_on_loopback_only(locked_head):
    for port in (locked_head.gcs_port, int(locked_head.dashboard_url.rsplit(":", 1)[1]), locked_head.metrics_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    ip = routable_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to probe")
    for port in (locked_head.gcs_port, int(locked_head.dashboard_url.rsplit(":", 1)[1]), locked_head.metrics_port):
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=5).close()
    targets = json.loads((locked_head.temp_dir / "prom_metrics_service_discovery.json").read_text())[0]["targets"]
    assert targets and all(t.startswith("127.0.0.1:") for t in targets), targets


def test_a_driver_with_the_stacks_environment_runs_work_on_the_head(locked_head, tmp_path):
    """What stack.sh gives its Prefect worker: loopback address, token mode, the token file."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=f"127.0.0.1:{locked_head.gcs_port}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    (tmp_path / "token").write_text(locked_head.token)
    code = "import ray; ray.init(log_to_driver=False); print('result', ray.get(ray.remote(lambda: 6 * 7).remote()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert "result 42" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
