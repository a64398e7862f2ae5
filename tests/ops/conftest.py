"""A Ray head started exactly as the local stack starts it (infra/local/ray-head.sh: token auth,
loopback only), on free ports and a private temp dir so that it runs beside other Rays."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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


class GiveUp(Exception):
    """Raised by a :func:`wait_for` condition: stop waiting now, the awaited state cannot come."""


def wait_for(condition, timeout: float, what: str, interval: float = 0.5, explain=None):
    """Poll ``condition`` until it returns a truthy value (returned) or fail after ``timeout`` s;
    ``explain()`` adds what the parts involved show to the failure message. Other exceptions
    count as "not yet", except :class:`GiveUp`, which propagates."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - reported if the deadline passes
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})"
                + (f"\n{explain()}" if explain else ""))


class HeadDidNotStart(GiveUp):
    """The head process ended while starting, or could not bind a port it was given."""


@pytest.fixture(scope="session")
def locked_head():
    """The local stack's Ray head; stopped (its whole process group) at the end."""
    if not (BIN / "ray").exists() or not shutil.which("bash"):
        pytest.skip(f"no ray executable beside {sys.executable}")
    tmp = Path(tempfile.mkdtemp(prefix="cnc-h-"))  # short: Ray's unix socket paths have a length limit
    try:
        proc, head = start_locked_head(tmp)
        try:
            yield head
        finally:
            _stop_group(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def start_locked_head(tmp: Path, attempts: int = 3) -> tuple[subprocess.Popen, Head]:
    """Start the head and wait until it serves. Ray takes its ports from the command line, so they
    are found free here and bound again by Ray, and another process can take one in between: the
    head then exits (the GCS port) or runs without a dashboard, and it starts again on new ports."""
    for attempt in range(1, attempts + 1):
        proc, head = _start_head(tmp / str(attempt))
        try:
            _wait_until_serving(proc, head)
            return proc, head
        except HeadDidNotStart:
            _stop_group(proc)
    pytest.fail(f"the Ray head did not start, {attempts} times; the last log:\n{head.log.read_text()[-3000:]}")


def _start_head(tmp: Path) -> tuple[subprocess.Popen, Head]:
    tmp.mkdir(parents=True)
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
    return proc, Head(f"http://127.0.0.1:{ports['DASHBOARD_PORT']}", ports["RAY_PORT"], ports["METRICS_PORT"], "",
                      tmp / "ray", log)


def _wait_until_serving(proc: subprocess.Popen, head: Head) -> None:
    """Wait for the token, the dashboard and the node's metrics endpoint; :class:`HeadDidNotStart`
    if the head process ends first or says a port was taken."""

    def alive(condition):
        def check():
            if proc.poll() is not None:
                raise HeadDidNotStart(f"exited with {proc.returncode}")
            if "because it's already occupied" in head.log.read_text(errors="replace"):
                raise HeadDidNotStart("a port was taken")  # Ray goes on without that server
            return condition()
        return check

    token_file = head.temp_dir.parent / "token"
    head.token = wait_for(alive(lambda: token_file.read_text().strip()), 60, "the token file")
    wait_for(alive(lambda: http_status(f"{head.dashboard_url}/api/jobs/", head.headers()) == 200), 180,
             f"the dashboard ({head.log})")
    sd = head.temp_dir / "prom_metrics_service_discovery.json"
    wait_for(alive(lambda: f":{head.metrics_port}" in json.dumps(json.loads(sd.read_text()))), 180,
             "the node's metrics endpoint in the service-discovery file")


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
