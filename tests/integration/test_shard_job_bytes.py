"""ingest and build-triplets write the same tar bytes on the shard-job runner as before it.

The hashes were computed once with the code before the runner existed, from the inputs below:
ingest's at commit e43feb0, the triplets' on the branch that changed the triplet stages to the
official CnC rules (dilation window, U2-Net preprocessing) without the runner, so that the runner's
share of the bytes is checked alone, with the pinned versions of constraints/cpu.txt (Pillow's JPEG encoder and torch's
kernels shape the bytes: a version bump may need them recomputed, with the reason in the commit).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tasks.ingest import run_ingest
from tasks.sample_images import write_sample_folder
from tasks.triplets.job import StageOptions, run_triplets

pytestmark = pytest.mark.slow

BEFORE_THE_RUNNER = {
    "ingest/shards/shard-000000.tar": "04d442077239afe12d6df5b705b3f9abd20a6c9c13fd2f6bfde9ef78300fab67",
    "ingest/shards/shard-000001.tar": "c19c06b9dc1c609c938ddabb8eff24ccfb3780d5b6250cd2f43d45a355ea539c",
    "triplets/shards/shard-000000.tar": "6f617eaf5becd987c1fb1034c662c5c78397161e4451aca47492ede0f57a774c",
    "triplets/shards/shard-000001.tar": "51f36ca0a27241ce8bba1b25ba9cd332e20641da7d34bb9693825312b51460b7",
}


def tar_hashes(root: Path, prefix: str) -> dict[str, str]:
    return {f"{prefix}/{p.relative_to(root)}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("shards/*.tar"))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bytes") / "photos"
    write_sample_folder(str(root), ["chelsea.png", "coffee.png", "rocket.jpg"])
    (root / "broken.jpg").write_bytes(b"not a jpeg")  # a reject in shard 1, beside a sample
    return root


def test_ingest_and_triplets_bytes_are_those_of_the_code_before_the_runner(photos, tmp_path):
    run_ingest("folder", str(photos), str(tmp_path / "ingest"), size=32, shard_size=2, executor="local")
    run_triplets(str(tmp_path / "ingest"), str(tmp_path / "triplets"), preset="tiny",
                 stages={"inpaint": StageOptions(batch_size=2, cfg={"num_inference_steps": 1})}, executor="local")
    got = {**tar_hashes(tmp_path / "ingest", "ingest"), **tar_hashes(tmp_path / "triplets", "triplets")}
    assert got == BEFORE_THE_RUNNER


@pytest.mark.parametrize("executor", ["ray", "processes"])
def test_ingest_writes_the_same_bytes_on_every_executor(ray_local, photos, tmp_path, executor):
    run_ingest("folder", str(photos), str(tmp_path / "ingest"), size=32, shard_size=2, executor=executor)
    assert tar_hashes(tmp_path / "ingest", "ingest") == {k: v for k, v in BEFORE_THE_RUNNER.items()
                                                         if k.startswith("ingest/")}


@pytest.mark.parametrize("executor", ["ray", "processes"])
def test_triplets_write_the_same_bytes_on_every_executor(ray_local, photos, tmp_path, executor):
    from tasks.run_options import RunOptions

    run_ingest("folder", str(photos), str(tmp_path / "ingest"), size=32, shard_size=2, executor="local")
    result = run_triplets(str(tmp_path / "ingest"), str(tmp_path / "triplets"), preset="tiny",
                          stages={"inpaint": StageOptions(batch_size=2, cfg={"num_inference_steps": 1})},
                          executor=executor, run_options=RunOptions(workers=2))
    assert result.executor == executor
    assert tar_hashes(tmp_path / "triplets", "triplets") == {k: v for k, v in BEFORE_THE_RUNNER.items()
                                                             if k.startswith("triplets/")}
