"""A real local Prefect stack for end-to-end tests: server (SQLite), process work pool, worker.

Everything runs as subprocesses on 127.0.0.1 with a private PREFECT_HOME, exactly as a user runs
`prefect server start`, `prefect deploy` and `prefect worker start`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.ports import listening_port

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


class PrefectStack:
    def __init__(self, home: Path, pool: str = "cnc-local"):
        self.home = home
        self.pool = pool
        self.port = 0  # the server binds a free port itself; start() reads which one
        self.api = ""
        self.env = {**os.environ, "PREFECT_HOME": str(home),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                    "CNC_RAY_DASHBOARD": "0", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, *args: str, log: str, env: dict | None = None) -> subprocess.Popen:
        fh = open(self.home / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def start(self) -> PrefectStack:
        self.home.mkdir(parents=True, exist_ok=True)
        # port 0: the server's own socket gets a free port, so no other process can take it between
        # choosing and binding (as with a port found free, released and bound again)
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        server = self._spawn("server", "start", "--host", "127.0.0.1", "--port", "0", log="server.log",
                             env=server_env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if server.poll() is not None:
                raise RuntimeError("prefect server exited:\n" + self.log("server.log"))
            if not self.port:
                self.port = listening_port(server.pid)
            if self.port:
                self.api = f"http://127.0.0.1:{self.port}/api"
                try:
                    with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            raise RuntimeError("prefect server did not start:\n" + self.log("server.log"))
        self.env["PREFECT_API_URL"] = self.api
        self.cli("work-pool", "create", self.pool, "--type", "process")
        return self

    def deploy(self, name: str) -> None:
        self.cli("deploy", "--name", name)  # "flow/deployment"

    def start_worker(self) -> None:
        self._spawn("worker", "start", "--pool", self.pool, log="worker.log")

    def run_deployment(self, deployment: str, params: dict, timeout: int = 600) -> str:
        """`prefect deployment run ... --watch`; returns its output. A non-zero exit (the run did
        not complete, or the command failed) raises with the output and the worker's log."""
        proc = subprocess.run([PREFECT, "--no-prompt", "deployment", "run", deployment, "--params", json.dumps(params),
                               "--watch", "--watch-interval", "2", "--watch-timeout", str(timeout)], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout + 60)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"prefect deployment run {deployment} exited {proc.returncode}:\n{output[-3000:]}\n"
                               f"worker log:\n{self.log('worker.log')}")
        return output

    def flow_run(self, run_id: str) -> dict:
        """The flow run as the API returns it (``state``, ``state_type``, ...)."""
        with urllib.request.urlopen(f"{self.api}/flow_runs/{run_id}", timeout=10) as r:
            return json.loads(r.read())

    def wait_for_state(self, run_id: str, state_types: set[str], timeout: float = 300) -> dict:
        """Poll the API until the run is in one of ``state_types`` (e.g. the final ones); the
        deadline fails."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in state_types:
                return run
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} not {state_types} within {timeout} s: {self.flow_run(run_id)['state_type']}")

    def state_history(self, run_id: str) -> list[str]:
        """The run's state types, oldest first."""
        request = urllib.request.Request(f"{self.api}/flow_run_states/?flow_run_id={run_id}")
        with urllib.request.urlopen(request, timeout=10) as r:
            states = json.loads(r.read())
        return [st["type"] for st in sorted(states, key=lambda st: st["timestamp"])]

    def start_deployment(self, deployment: str, params: dict) -> str:
        """`prefect deployment run` without waiting; returns the flow run id."""
        return flow_run_id(self.cli("deployment", "run", deployment, "--params", json.dumps(params)).stdout)

    def cancel(self, run_id: str) -> None:
        self.cli("flow-run", "cancel", run_id)

    def log(self, name: str) -> str:
        path = self.home / name
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.home / "storage", ignore_errors=True)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def flow_run_id(output: str) -> str:
    """The flow run id printed by `prefect deployment run`."""
    import re

    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    if not match:
        raise AssertionError(f"no flow run id in:\n{output}")
    return match.group(1)
