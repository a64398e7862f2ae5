"""A Ray head started exactly as the local stack starts it (infra/local/ray-head.sh: token auth,
loopback only), on free ports and a private temp dir so that it runs beside other Rays."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    dashboard_url: str
    gcs_port: int
    metrics_port: int
    token: str
    temp_dir: Path
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def http_status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers={**(headers or {}), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(condition, timeout: float, what: str, interval: float = 0.5, explain=None):
    """Poll ``condition`` until it returns a truthy value (returned) or fail after ``timeout`` s;
    ``explain()`` adds what the parts involved show to the failure message."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as exc:  # noqa: BLE001 - reported if the deadline passes
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})"
                + (f"\n{explain()}" if explain else ""))


@pytest.fixture(scope="session")
def locked_head():
    """The local stack's Ray head; stopped (its whole process group) at the end."""
    if not (BIN / "ray").exists() or not shutil.which("bash"):
        pytest.skip(f"no ray executable beside {sys.executable}")
    tmp = Path(tempfile.mkdtemp(prefix="cnc-h-"))  # short: Ray's unix socket paths have a length limit
    ports = {name: free_port() for name in ("RAY_PORT", "DASHBOARD_PORT", "METRICS_PORT", "DASHBOARD_AGENT_PORT",
                                            "CLIENT_PORT", "DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "BIN": str(BIN), "RAY_TEMP_DIR": str(tmp / "ray"),
           "RAY_AUTH_TOKEN_PATH": str(tmp / "token"), "RAY_NUM_CPUS": "2", "RAY_BLOCK": "1",
           "PYTHONPATH": str(ROOT), "RAY_EXTRA_ARGS": '--system-config={"metrics_report_interval_ms":1000}'}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(var, None)
    log = tmp / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "infra/local/ray-head.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    head = Head(f"http://127.0.0.1:{ports['DASHBOARD_PORT']}", ports["RAY_PORT"], ports["METRICS_PORT"], "", tmp / "ray",
                log)
    try:
        head.token = wait_for(lambda: (tmp / "token").read_text().strip(), 60, "the token file")
        wait_for(lambda: proc.poll() is None and http_status(f"{head.dashboard_url}/api/jobs/", head.headers()) == 200,
                 180, f"the dashboard ({log})")
        sd = tmp / "ray" / "prom_metrics_service_discovery.json"
        wait_for(lambda: f":{ports['METRICS_PORT']}" in json.dumps(json.loads(sd.read_text())), 180,
                 "the node's metrics endpoint in the service-discovery file")
        yield head
    finally:
        _stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the head's process group (ours alone: it was started in a new session)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or a zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(timeout=5)
                return
            time.sleep(0.2)
