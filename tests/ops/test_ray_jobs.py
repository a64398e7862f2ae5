"""Long jobs through the Ray Jobs API on a token-protected head: submit, stream logs, complete;
a re-run follows the same job; an interrupted caller stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from tasks.ray_jobs import JobSpec, RayJobError, client, find_or_submit, run_job, stop, submission_id
from tests.ops.conftest import ROOT, wait_for

pytestmark = pytest.mark.slow


def py(code: str) -> str:
    """An entrypoint running ``code`` with the job's Python."""
    import shlex

    return shlex.join(["python", "-c", textwrap.dedent(code)])


@pytest.fixture
def token_env(locked_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", locked_head.token)


def jobs_with_key(address: str, key: str) -> list:
    return [j for j in client(address).list_jobs() if (j.metadata or {}).get("cnc_key") == key]


def test_submit_streams_logs_completes_and_a_rerun_attaches(locked_head, token_env):
    key = f"flow-run-{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    spec = JobSpec(entrypoint=py("""
        import time
        for i in range(3):
            print(f"step {i}", flush=True)
            time.sleep(0.3)
        print('CNC_RESULT {"n": 3, "source": "s3://AKIA:SECRET@bucket/x"}', flush=True)
    """), key=key, name="test", metadata={"prefect_flow_run_id": key})
    out = run_job(spec, locked_head.dashboard_url, on_line=lines.append, capture="CNC_RESULT", poll_seconds=0.5)
    assert out.status == "SUCCEEDED" and not out.attached and out.submission_id == submission_id(spec, 1)
    assert [ln for ln in lines if ln.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert out.lines == ['CNC_RESULT {"n": 3, "source": "s3://REDACTED@bucket/x"}']  # redacted on the way in
    info = client(locked_head.dashboard_url).get_job_info(out.submission_id)
    assert info.metadata["prefect_flow_run_id"] == key

    again: list[str] = []
    rerun = run_job(JobSpec(entrypoint=py("print('a second job')"), key=key, name="test"), locked_head.dashboard_url,
                    on_line=again.append, capture="CNC_RESULT", poll_seconds=0.5)
    assert rerun.attached and rerun.submission_id == out.submission_id and rerun.status == "SUCCEEDED"
    assert "a second job" not in again
    assert len(jobs_with_key(locked_head.dashboard_url, key)) == 1


def test_a_failed_job_raises_and_a_rerun_submits_the_next_attempt(locked_head, token_env):
    key = f"flow-run-{uuid.uuid4().hex[:8]}"
    spec = JobSpec(entrypoint=py("import sys; print('boom'); sys.exit(3)"), key=key, name="test")
    with pytest.raises(RayJobError, match="FAILED"):
        run_job(spec, locked_head.dashboard_url, on_line=lambda _: None, poll_seconds=0.5)
    jobs = client(locked_head.dashboard_url)
    sid, attached = find_or_submit(jobs, JobSpec(entrypoint=py("print('fixed')"), key=key, name="test"))
    try:
        assert (sid, attached) == (submission_id(spec, 2), False)
        assert len(jobs_with_key(locked_head.dashboard_url, key)) == 2
    finally:
        stop(jobs, sid)


DRIVER = """
import signal, sys
from prefect.exceptions import TerminationSignal
from tasks.ray_jobs import JobSpec, run_job

def bridge(signum, frame):  # what Prefect installs in a flow-run process: SIGTERM -> TerminationSignal
    raise TerminationSignal(signal=signum)

signal.signal(signal.SIGTERM, bridge)
spec = JobSpec(entrypoint=sys.argv[2], key=sys.argv[3], name="test")
run_job(spec, sys.argv[1], on_line=lambda line: print(line, flush=True), poll_seconds=0.5)
"""


def test_cancelling_the_caller_stops_the_ray_job(locked_head, token_env):
    key = f"flow-run-{uuid.uuid4().hex[:8]}"
    entry = py("""
        import time
        print("working", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, locked_head.dashboard_url, entry, key],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        sid = submission_id(JobSpec(entrypoint="", key=key, name="test"), 1)
        jobs = client(locked_head.dashboard_url)
        wait_for(lambda: str(jobs.get_job_status(sid).value) == "RUNNING", 120, "the job to run")
        wait_for(lambda: "working" in jobs.get_job_logs(sid), 60, "the job's first log line")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert str(jobs.get_job_status(sid).value) == "STOPPED", proc.stdout.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
