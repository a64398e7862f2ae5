"""The shard-job runner: lease, claim, input hashes, bounded retries, failed shards, reject share, sweep.

A toy job (one text sample per shard) keeps these fast; ingest's own behaviour on the runner is
tested in tests/integration/test_ingest.py and test_shard_job_bytes.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import storage
from tasks.lease import Lease, OutputBusy
from tasks.shard_job import (OutputConflict, RunOptions, RunReport, Shard, ShardJob, ShardJobFailed, TooManyRejects,
                             choose_executor, is_transient, run_shard_job)
from tasks.shards import read_input_hash


@dataclass
class Toy(ShardJob):
    """Shard i holds the inputs ``inputs[i]``; an input named ``bad*`` is rejected; shards in
    ``broken`` raise on every attempt; each attempt appends its shard to ``attempts.txt``."""

    root: str
    inputs: list[list[str]]
    broken: tuple[int, ...] = ()
    error: type[BaseException] = OSError
    poison: str = ""  # "die" or "hang": what shard 1 does
    kind: str = "toy"
    seen: list[int] = field(default_factory=list)

    @property
    def out_url(self) -> str:  # type: ignore[override]
        return self.root

    def identity(self) -> dict:
        return {"toy": 1}

    def plan(self) -> list[Shard]:
        return [self.shard(i, names, len(names)) for i, names in enumerate(self.inputs)]

    def process_shard(self, shard: Shard) -> dict:
        if "://" not in self.root:
            with open(Path(self.root) / "attempts.txt", "a") as fh:
                fh.write(f"{shard.index}\n")
        if shard.index in self.broken:
            raise self.error(f"shard {shard.index} cannot be read")
        if shard.index == 1 and self.poison == "die":
            os._exit(3)  # as a segfault or the OOM killer would end the worker
        if shard.index == 1 and self.poison == "hang":
            time.sleep(3600)
        with shard.writer() as w:
            for name in shard.inputs:
                if name.startswith("bad"):
                    w.add_reject(name, "bad_input", detail=f"{name} is bad")
                else:
                    w.add_sample(name.replace(".", "_"), name, {"txt": name.encode()})
            return w.commit()

    def finalize(self, report: RunReport) -> RunReport:
        report.write_manifest({"kind": "toy", "inputs": report.inputs})
        return report


def attempts(root: Path) -> list[int]:
    path = root / "attempts.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def run(job: Toy, **kw) -> RunReport:
    return run_shard_job(job, RunOptions(executor="local", **kw))


# ------------------------------------------------------------------------------- lease (issue 15 item 6)


def test_a_second_live_run_on_the_same_output_is_refused_and_runs_after_release(tmp_path):
    out = tmp_path / "out"
    holder = Lease(str(out), seconds=60).acquire()
    with pytest.raises(OutputBusy, match=f"run {holder.run_id}"):
        run(Toy(str(out), [["a"]]))
    assert attempts(out) == []  # refused before any work
    holder.release()
    report = run(Toy(str(out), [["a"]]))
    assert report.written == [0]
    assert not (out / "_lease").exists()  # a finished run leaves no lease behind


def test_an_expired_lease_of_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    (out / "_lease").mkdir(parents=True)
    dead = {"run_id": "dead-run", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    (out / "_lease" / "000001.json").write_text(json.dumps(dead))
    lease = Lease(str(out), seconds=60).acquire()
    assert lease.generation == 2 and lease.took_over["run_id"] == "dead-run"
    with pytest.raises(OutputBusy):  # now the new run's lease is the live one
        Lease(str(out), seconds=60).acquire()
    lease.release()
    assert not (out / "_lease").exists()


def test_a_live_lease_of_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    (out / "_lease").mkdir(parents=True)
    killed = {"run_id": "killed", "host": socket.gethostname(), "pid": int(gone.stdout), "expires": time.time() + 600}
    (out / "_lease" / "000001.json").write_text(json.dumps(killed))
    report = run(Toy(str(out), [["a"]]))
    assert report.written == [0]


def test_a_run_that_lost_its_lease_to_another_stops(tmp_path):
    out = tmp_path / "out"
    lease = Lease(str(out), seconds=60).acquire()
    lease._stop.set()  # its renewals stopped (a stalled driver); another run then took over
    (out / "_lease" / "000002.json").write_text(json.dumps({"run_id": "other", "expires": time.time() + 60}))
    lease.renew()
    with pytest.raises(OutputBusy, match="took over"):
        lease.check()
    lease.release()
    assert (out / "_lease" / "000002.json").exists()  # the other run's lease is left alone


def test_two_runs_racing_for_a_free_lease_on_memory_get_one_winner(memory_url):
    first = Lease(memory_url, seconds=60).acquire()
    with pytest.raises(OutputBusy):
        Lease(memory_url, seconds=60).acquire()
    first.release()


# ----------------------------------------------------------------- claim and input hashes (item 7)


def test_resume_refuses_shards_made_from_other_inputs(tmp_path):
    out = tmp_path / "out"
    run(Toy(str(out), [["a", "b"], ["c"]]))
    assert read_input_hash(str(out / "shards" / "shard-000000.parquet")) is not None
    (out / "manifest.json").unlink()  # a crash before the end
    # the source changed: a new file sorts first, so shard 0 would now hold other inputs
    with pytest.raises(OutputConflict, match="shard 0 .* other inputs"):
        run(Toy(str(out), [["0", "a"], ["b", "c"]]), resume=True)
    report = run(Toy(str(out), [["a", "b"], ["c"]]), resume=True)  # the same inputs resume fine
    assert report.written == [] and report.inputs == 3


def test_a_finished_output_reruns_as_a_no_op_and_an_unfinished_one_needs_resume(tmp_path):
    out = tmp_path / "out"
    run(Toy(str(out), [["a"], ["b"]]))
    assert run(Toy(str(out), [["a"], ["b"]])).written == []
    (out / "manifest.json").unlink()
    with pytest.raises(OutputConflict, match="--resume"):
        run(Toy(str(out), [["a"], ["b"]]))


def test_leftover_temporary_files_are_swept_on_start(tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    dead = out / "shards" / ".shard-000000.tar.tmp-0123abcd"
    dead.write_bytes(b"half a tar")
    keep = out / "shards" / "notes.tmp-but-not-hidden"
    keep.write_bytes(b"not ours")
    run(Toy(str(out), [["a"]]))
    assert not dead.exists() and keep.exists()


# ------------------------------------------------------------- retries and failed shards (items 9, 10)


def test_a_shard_that_keeps_failing_is_retried_a_bounded_number_of_times_and_named(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ShardJobFailed, match=r"1 of 3 shards failed: shard 1 \(OSError: shard 1 cannot be read\)"
                       ) as info:
        run(Toy(str(out), [["a"], ["b"], ["c"]], broken=(1,)), max_attempts=2)
    assert info.value.failed == {1: "OSError: shard 1 cannot be read"}
    assert sorted(attempts(out)) == [0, 1, 1, 2]  # shard 1 tried exactly twice, the others once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failed_shards"] == [{"shard": 1, "inputs": 1, "error": "OSError: shard 1 cannot be read"}]
    assert manifest["inputs"] == 2  # the committed shards' inputs; shard 1's are in failed_shards
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["shard-000000.parquet",
                                                                          "shard-000002.parquet"]
    # an output with a failed shard is unfinished: a plain rerun is refused, --resume retries only it
    with pytest.raises(OutputConflict, match="--resume"):
        run(Toy(str(out), [["a"], ["b"], ["c"]]))
    (out / "attempts.txt").unlink()
    report = run(Toy(str(out), [["a"], ["b"], ["c"]]), resume=True)
    assert report.written == [1] and attempts(out) == [1]
    assert json.loads((out / "manifest.json").read_text())["failed_shards"] == []


def test_memory_errors_are_not_turned_into_failed_shards(tmp_path):
    with pytest.raises(MemoryError):
        run(Toy(str(tmp_path / "out"), [["a"], ["b"]], broken=(0,), error=MemoryError))
    assert attempts(tmp_path / "out") == [0]


def test_rejects_carry_detail_and_retryable(tmp_path):
    out = tmp_path / "out"
    run(Toy(str(out), [["a", "bad1"]]))
    rows = pq.read_table(out / "rejects.parquet").to_pylist()
    assert rows == [{"source_id": "bad1", "reason": "bad_input", "shard": 0, "detail": "bad1 is bad",
                     "retryable": False}]


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError("peer"), True), (TimeoutError("slow"), True), (OSError(5, "EIO"), True),
    (type("ServiceUnavailable", (Exception,), {})("503"), True), (FileNotFoundError("x"), False),
    (ValueError("not a JPEG"), False), (PermissionError(13, "denied"), False),
])
def test_transient_errors_are_told_from_per_file_ones(exc, transient):
    assert is_transient(exc) is transient


# ------------------------------------------------------------------------------ reject share (item 12)


def test_a_run_that_rejects_every_input_fails_after_writing_its_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TooManyRejects, match=r"2 of 2 inputs were rejected \(100%\): bad_input \(2\)"):
        run(Toy(str(out), [["bad1"], ["bad2"]]))
    assert (out / "manifest.json").exists() and (out / "rejects.parquet").exists()


def test_the_reject_share_is_configurable(tmp_path):
    assert run(Toy(str(tmp_path / "a"), [["a", "bad1", "bad2"]])).inputs == 3  # 2 of 3: fine by default
    with pytest.raises(TooManyRejects, match="2 of 3"):
        run(Toy(str(tmp_path / "b"), [["a", "bad1", "bad2"]]), max_reject_share=0.5)


def test_storage_helpers_see_a_memory_output(memory_url):
    report = run(Toy(memory_url, [["a"], ["bad"]]))
    assert report.inputs == 2 and storage.exists(f"{memory_url}/manifest.json")
    assert not storage.exists(f"{memory_url}/_lease")


# ------------------------------------------------------------------ executors (issue 16: processes, auto)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "attempts.txt"}


def test_the_process_pool_writes_the_same_bytes_as_this_process(tmp_path):
    inputs = [["a", "bad1"], ["b"], ["c", "d"]]
    run(Toy(str(tmp_path / "local"), inputs))
    report = run_shard_job(Toy(str(tmp_path / "procs"), inputs), RunOptions(executor="processes", workers=2))
    assert report.executor == "processes" and sorted(report.written) == [0, 1, 2]
    assert tree_bytes(tmp_path / "procs") == tree_bytes(tmp_path / "local")


@pytest.mark.parametrize("poison, attempts_, timeout, error", [
    ("die", 2, None, r"worker process died \(exit code 3\)"),
    # the timeout leaves ample room for the good shards on a loaded 2-core machine
    ("hang", 1, 5.0, "timed out after 5 s"),
])
def test_a_poison_shard_in_the_process_pool_costs_only_its_own_attempts(tmp_path, poison, attempts_, timeout, error):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShardJobFailed, match=f"1 of 3 shards failed: shard 1 \\({error}"):
        run_shard_job(Toy(str(out), [["a"], ["b"], ["c"]], poison=poison),
                      RunOptions(executor="processes", workers=2, max_attempts=attempts_, shard_timeout_s=timeout))
    assert sorted(attempts(out)) == sorted([0, 2] + [1] * attempts_)  # shard 1 as often as allowed, the others once
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["shard-000000.tar", "shard-000002.tar"]


def test_auto_picks_and_says_why(tmp_path, memory_url, monkeypatch):
    import tasks.shard_job as sj

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(sj, "_ray_running", lambda: False)
    monkeypatch.setattr(sj.os, "cpu_count", lambda: 2)
    job = Toy(str(tmp_path), [["a"]])
    assert choose_executor("auto", job, 5) == ("processes", "one machine and no RAY_ADDRESS: a process pool "
                                                            "(use --executor ray for Ray)")
    assert choose_executor("auto", job, 1)[0] == "local"
    assert choose_executor("auto", Toy(memory_url, [["a"]]), 5)[0] == "local"
    assert choose_executor("local", job, 5) == ("local", "asked for")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert choose_executor("auto", job, 5) == ("ray", "RAY_ADDRESS is set")
    with pytest.raises(ValueError, match="got 'spark'"):
        choose_executor("spark", job, 5)
    heard: list[str] = []
    monkeypatch.delenv("RAY_ADDRESS")
    run_shard_job(Toy(str(tmp_path / "o"), [["a"], ["b"]]), RunOptions(executor="auto", announce=heard.append))
    assert heard == ["toy: executor processes (one machine and no RAY_ADDRESS: a process pool "
                     "(use --executor ray for Ray))"]
    heard.clear()
    run_shard_job(Toy(str(tmp_path / "o1"), [["a"], ["b"]]),
                  RunOptions(executor="auto", workers=1, announce=heard.append))
    assert heard == ["toy: executor local (too little work to share among workers (or one core): this process)"]


def test_pool_workers_die_with_a_run_that_is_killed_outright(tmp_path):
    """SIGKILL of the run (a cancelled flow run's process, the OOM killer) leaves no worker behind
    computing a shard for nobody: here one hangs on shard 1 and would otherwise sleep for an hour."""
    import signal
    import subprocess
    import sys

    import psutil

    out = tmp_path / "out"
    out.mkdir()
    code = ("from tests.test_shard_job import Toy; from tasks.shard_job import RunOptions, run_shard_job; "
            f"run_shard_job(Toy({str(out)!r}, [['a'], ['b'], ['c']], poison='hang'), "
            "RunOptions(executor='processes', workers=2))")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 120
        while 1 not in attempts(out):  # the hanging shard has started in a worker
            assert run.poll() is None and time.time() < deadline, "the run ended or never reached shard 1"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(run.pid).children()
                   if "spawn_main" in " ".join(p.cmdline())]
        assert workers
        run.send_signal(signal.SIGKILL)
        run.wait(30)
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert alive == [], f"workers still running after their run was killed: {alive}"
    finally:
        if run.poll() is None:
            run.kill()
