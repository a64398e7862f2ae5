"""The runner on Ray: a poison shard (its worker dies every time) and a hanging shard end as failed
shards after a bounded number of attempts; the lease's create-if-absent holds on a real S3 server."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.lease import Lease, OutputBusy, _create_exclusive
from tasks.shard_job import RunOptions, RunReport, Shard, ShardJob, ShardJobFailed, run_shard_job

pytestmark = pytest.mark.slow


@dataclass
class Poison(ShardJob):
    """Shard 1 kills its worker process (as a segfault or the OOM killer would) or hangs."""

    root: str
    how: str
    kind: str = "poison"

    @property
    def out_url(self) -> str:  # type: ignore[override]
        return self.root

    def identity(self) -> dict:
        return {"how": self.how}

    def plan(self) -> list[Shard]:
        return [self.shard(i, [f"in-{i}"], 1) for i in range(3)]

    def process_shard(self, shard: Shard) -> dict:
        if shard.index == 1:
            with open(Path(self.root) / "attempts.txt", "a") as fh:
                fh.write("1\n")
            if self.how == "die":
                os._exit(1)
            time.sleep(3600)
        with shard.writer() as w:
            w.add_sample(f"k{shard.index}", f"in-{shard.index}", {"txt": b"x"})
            return w.commit()

    def finalize(self, report: RunReport) -> RunReport:
        report.write_manifest({"kind": "poison"})
        return report


@pytest.fixture(autouse=True)
def ship_this_module_to_workers(ray_local):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("how, tries, timeout, error", [
    ("die", 2, None, "Worker"),
    # on Ray the timeout also covers the wait for a worker: ample room for the good shards
    ("hang", 1, 6.0, "timed out after 6 s"),
])
def test_a_poison_shard_is_tried_max_attempts_times_then_recorded_as_failed(tmp_path, how, tries, timeout, error):
    out = tmp_path / how
    out.mkdir()
    with pytest.raises(ShardJobFailed, match=f"1 of 3 shards failed: shard 1 .*{error}") as info:
        run_shard_job(Poison(str(out), how), RunOptions(executor="ray", max_attempts=tries, shard_timeout_s=timeout))
    assert list(info.value.failed) == [1]
    assert (out / "attempts.txt").read_text().split() == ["1"] * tries  # exactly max_attempts, not forever
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["shard"] for f in manifest["failed_shards"]] == [1]
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["shard-000000.tar", "shard-000002.tar"]


def test_the_lease_is_create_if_absent_on_a_real_s3_server(s3_bucket):
    url = f"{s3_bucket}/out/_lease/000001.json"
    assert _create_exclusive(url, b"first")
    assert not _create_exclusive(url, b"second")  # If-None-Match: the first writer keeps it
    holder = Lease(f"{s3_bucket}/other", seconds=60).acquire()
    with pytest.raises(OutputBusy, match=holder.run_id):
        Lease(f"{s3_bucket}/other", seconds=60).acquire()
    holder.release()
    Lease(f"{s3_bucket}/other", seconds=60).acquire().release()
