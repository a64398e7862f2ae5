"""build-triplets on a real local Ray with the tiny preset: invariants, accounting, resume, rejects."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.ingest import run_ingest
from tasks.sample_images import SAMPLE_PHOTOS, write_sample_folder
from tasks.shards import iter_tar_samples
from tasks.triplets.job import StageOptions, run_triplets

pytestmark = pytest.mark.slow
SIZE = 64
STAGES = {"inpaint": StageOptions(batch_size=4, cfg={"num_inference_steps": 2})}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triplets")
    write_sample_folder(str(root / "photos"))
    Image.new("RGB", (200, 150), "black").save(root / "photos" / "all-black.png")
    run_ingest("folder", str(root / "photos"), str(root / "ingest"), size=SIZE, shard_size=3, executor="local")
    return root


@pytest.fixture(scope="module")
def triplets(ray_local, ingested):
    out = ingested / "triplets"
    result = run_triplets(str(ingested / "ingest"), str(out), preset="tiny", stages=STAGES)
    return out, result


def test_every_source_is_a_triplet_or_a_reject(triplets):
    out, result = triplets
    n = len(SAMPLE_PHOTOS) + 1
    assert result.num_sources == n
    assert result.num_triplets + result.num_rejects == n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["sources"] == n
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert len(rejects) == result.num_rejects
    assert {r["source_id"] for r in rejects if r["source_id"] == "all-black.png"} == {"all-black.png"}
    keys = [s["__key__"] for u in result.shard_urls for s in iter_tar_samples(u)]
    assert len(keys) == len(set(keys)) == result.num_triplets
    assert list((out / "_staging").rglob("*.tar")) == []  # every staged part was assembled and removed


def test_triplet_invariants_hold_exactly(triplets):
    _, result = triplets
    checked = 0
    for url in result.shard_urls:
        for s in iter_tar_samples(url):
            src, fg, mask = decode(s["src.jpg"]), decode(s["fg.png"]), decode(s["mask.png"])
            bg = decode(s["bg.jpg"])
            assert set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(fg, src * (mask[..., None] // 255))
            for name in ("depth_fg.png", "depth_bg.png"):
                img = Image.open(io.BytesIO(s[name]))
                depth = np.asarray(img)
                assert img.mode.startswith("I;16") and depth.dtype == np.uint16
                assert np.isfinite(depth).all()
                assert depth.shape == (SIZE, SIZE)
            assert src.shape[:2] == fg.shape[:2] == mask.shape == bg.shape[:2] == (SIZE, SIZE)
            checked += 1
    assert checked == result.num_triplets > 0


def test_local_executor_gives_the_same_bytes(triplets, ingested):
    out, _ = triplets
    other = ingested / "triplets-local"
    run_triplets(str(ingested / "ingest"), str(other), preset="tiny", stages=STAGES, executor="local")
    assert tree_bytes(other) == tree_bytes(out)


def test_resume_after_a_crash_recomputes_only_missing_samples(triplets, ingested):
    out, result = triplets
    copy = ingested / "triplets-crashed"
    before = tree_bytes(out)
    for rel, data in before.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    (copy / "shards" / "shard-000001.parquet").unlink()
    (copy / "shards" / "shard-000001.tar").unlink()
    (copy / "manifest.json").unlink()
    assembled: list[int] = []
    run_triplets(str(ingested / "ingest"), str(copy), preset="tiny", stages=STAGES, resume=True,
                 executor="local", on_shard=assembled.append)
    assert assembled == [1]
    assert tree_bytes(copy) == before
