"""`--resume` after a real crash, at the windows the README promises to survive:

- build-triplets staged some samples of a shard, then died: the resume inpaints exactly the
  samples that never reached staging (counted at the inpainting stage) and writes the bytes of an
  uninterrupted run;
- a shard's tar is published but its index (the commit marker) is not, at both stages: the
  shard is redone, nothing is duplicated, the counts are exact and the bytes are an uninterrupted
  run's.

The crashes are real: the job runs in its own process (tests/integration/crash_job.py), which
``os._exit``s at the planted point, leaving its lease, temporary files and staging behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.ingest import run_ingest
from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tasks.shards import iter_tar_samples, read_index
from tasks.triplets import stages, staging
from tasks.triplets.job import StageOptions, run_triplets
from tests.integration.crash_job import CRASHED

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SIZE = 64
SHARD_SIZE = 4  # 6 photos: shard 0 holds 4, shard 1 holds 2
INPAINT = {"batch_size": 2, "cfg": {"num_inference_steps": 2}}  # shard 0 is two inpainting batches
STAGES = {"inpaint": StageOptions(**INPAINT)}
N = len(SAMPLE_PHOTOS)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ok_keys(ingest: Path, shard: int) -> list[str]:
    """The ingested samples of one shard, in order (what build-triplets turns into triplets)."""
    rows = read_index(str(ingest / "shards" / f"shard-{shard:06d}.parquet")).to_pylist()
    return [r["key"] for r in rows if r["status"] == "ok"]


def run_crashing(job: str, args: list, kwargs: dict, crash: dict) -> None:
    """Run ``job`` in its own process until it dies at ``crash`` (see crash_job.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    spec = {"job": job, "args": args, "kwargs": kwargs, "crash": crash}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.crash_job", json.dumps(spec)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == CRASHED, f"no crash at {crash} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Photos, their ingest and their triplets, each from one uninterrupted run."""
    root = tmp_path_factory.mktemp("windows")
    write_sample_folder(str(root / "photos"))
    run_ingest("folder", str(root / "photos"), str(root / "ingest"), size=SIZE, shard_size=SHARD_SIZE,
               executor="local")
    run_triplets(str(root / "ingest"), str(root / "triplets"), preset="tiny", stages=STAGES, executor="local")
    assert sorted(p.name for p in (root / "triplets" / "shards").iterdir()) == [
        "shard-000000.parquet", "shard-000000.tar", "shard-000001.parquet", "shard-000001.tar"]
    return root


@pytest.fixture
def inpainted(monkeypatch) -> list[str]:
    """The keys of every row the inpainting stage receives in this process, in order."""
    keys: list[str] = []

    class CountingInpaint(stages.InpaintStage):
        def __call__(self, batch):
            keys.extend(str(k) for k in batch["key"])
            return super().__call__(batch)

    monkeypatch.setitem(stages.STAGE_CLASSES, "inpaint", CountingInpaint)
    return keys


def triplet_kwargs() -> dict:
    return {"preset": "tiny", "stages": {"inpaint": INPAINT}, "executor": "local"}


def test_resume_recomputes_only_samples_that_never_reached_staging(reference, tmp_path, inpainted):
    ingest, out = reference / "ingest", tmp_path / "triplets"
    # the first inpainting batch (2 samples of shard 0) is staged; the process dies in the second
    run_crashing("triplets", [str(ingest), str(out)], triplet_kwargs(), {"at": "inpaint", "call": 2})
    staged = set(staging.staged_rows(str(out), 0))
    assert staged == set(ok_keys(ingest, 0)[:2])
    assert staging.staged_rows(str(out), 1) == {}
    assert not list((out / "shards").glob("*.parquet")) and not (out / "manifest.json").exists()

    redone: list[int] = []
    result = run_triplets(str(ingest), str(out), preset="tiny", stages=STAGES, resume=True, executor="local",
                          on_shard=redone.append)
    never_staged = [k for i in (0, 1) for k in ok_keys(ingest, i) if k not in staged]
    assert len(never_staged) == N - 2
    assert sorted(inpainted) == sorted(never_staged)  # each exactly once; the staged two not again
    assert redone == [0, 1]
    assert result.num_sources == N == result.num_triplets + result.num_rejects
    assert result.num_computed == len(never_staged)  # what its throughput counts
    assert tree_bytes(out) == tree_bytes(reference / "triplets")


def _tar_without_index(out: Path, shard: int) -> None:
    tar, index = out / "shards" / f"shard-{shard:06d}.tar", out / "shards" / f"shard-{shard:06d}.parquet"
    assert tar.exists() and not index.exists()
    assert (out / "shards" / "shard-000000.parquet").exists()  # the shard before it is committed
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("how", ["crash", "index deleted"])
def test_ingest_redoes_a_shard_whose_tar_was_published_without_its_index(reference, tmp_path, how):
    out = tmp_path / "ingest"
    if how == "crash":  # the process dies right after the tar of shard 1 is published
        run_crashing("ingest", ["folder", str(reference / "photos"), str(out)],
                     {"size": SIZE, "shard_size": SHARD_SIZE, "executor": "local"},
                     {"at": "index", "url": str(out / "shards" / "shard-000001.parquet")})
        assert (out / "_lease").exists()  # a hard crash: nothing was cleaned up
    else:
        shutil.copytree(reference / "ingest", out)
        (out / "shards" / "shard-000001.parquet").unlink()
        (out / "manifest.json").unlink()
    _tar_without_index(out, 1)

    redone: list[int] = []
    result = run_ingest("folder", str(reference / "photos"), str(out), size=SIZE, shard_size=SHARD_SIZE,
                        resume=True, executor="local", on_shard=lambda row: redone.append(row["shard"]))
    assert redone == [1]
    assert result.num_inputs == N == result.num_samples + result.num_rejects
    assert result.num_inputs_run == N - SHARD_SIZE  # this run's share: shard 1's inputs
    keys = [s["__key__"] for u in result.shard_urls for s in iter_tar_samples(u)]
    assert len(keys) == len(set(keys)) == result.num_samples  # nothing twice
    assert len(read_index(str(out / "shards" / "shard-000001.parquet"))) == N - SHARD_SIZE
    assert tree_bytes(out) == tree_bytes(reference / "ingest")


@pytest.mark.parametrize("how", ["crash", "index deleted"])
def test_triplets_redo_a_shard_whose_tar_was_published_without_its_index(reference, tmp_path, inpainted, how):
    ingest, out = reference / "ingest", tmp_path / "triplets"
    if how == "crash":  # the process dies right after the tar of shard 1 is published; its samples are staged
        run_crashing("triplets", [str(ingest), str(out)], triplet_kwargs(),
                     {"at": "index", "url": str(out / "shards" / "shard-000001.parquet")})
        assert set(staging.staged_rows(str(out), 1)) == set(ok_keys(ingest, 1))
        recompute: list[str] = []  # assembled again from staging
    else:  # a finished run's shard loses its index: its staging is gone, its samples are made again
        shutil.copytree(reference / "triplets", out)
        (out / "shards" / "shard-000001.parquet").unlink()
        (out / "manifest.json").unlink()
        recompute = ok_keys(ingest, 1)
    _tar_without_index(out, 1)

    redone: list[int] = []
    result = run_triplets(str(ingest), str(out), preset="tiny", stages=STAGES, resume=True, executor="local",
                          on_shard=redone.append)
    assert redone == [1]
    assert sorted(inpainted) == sorted(recompute)
    assert result.num_sources == N == result.num_triplets + result.num_rejects
    keys = [s["__key__"] for u in result.shard_urls for s in iter_tar_samples(u)]
    assert len(keys) == len(set(keys)) == result.num_triplets  # nothing twice
    index = read_index(str(out / "shards" / "shard-000001.parquet")).to_pylist()
    assert len(index) == N - SHARD_SIZE and len({r["key"] for r in index}) == len(index)
    assert not (out / "_staging").exists()
    assert tree_bytes(out) == tree_bytes(reference / "triplets")
