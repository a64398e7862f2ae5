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
    reasons = {r["source_id"]: r["reason"] for r in rejects}
    assert len(reasons) == len(rejects)  # one record per rejected source
    assert reasons.get("all-black.png") == "blank_image"
    assert all(reasons.values()), reasons  # every reject says why
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


def test_rerunning_a_finished_run_changes_no_byte(triplets, ingested):
    out, result = triplets
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assembled: list[int] = []
    again = run_triplets(str(ingested / "ingest"), str(out), preset="tiny", stages=STAGES, on_shard=assembled.append)
    assert assembled == []  # nothing recomputed
    assert again.num_triplets == result.num_triplets and again.num_rejects == result.num_rejects
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    changed_bytes = [str(p.relative_to(out)) for p in files if p.read_bytes() != before[p][0]]
    rewritten = [str(p.relative_to(out)) for p in files if p.stat().st_mtime_ns != before[p][1]]
    assert changed_bytes == []
    # no shard or index is written again (the manifest, rejects table and contact sheet are, with the same bytes)
    assert [r for r in rewritten if r.startswith("shards/")] == []


def test_triplet_shards_read_back_with_webdataset_wids_and_ray_data(triplets):
    import ray
    import webdataset as wds
    import wids

    out, result = triplets
    n = result.num_triplets
    keys = {s["__key__"] for u in result.shard_urls for s in iter_tar_samples(u)}
    assert len(keys) == n > 0
    samples = list(wds.WebDataset(result.shard_urls, shardshuffle=False, empty_check=False))
    assert {s["__key__"] for s in samples} == keys
    for s in samples:  # the documented files of a sample (docs/data-format.md)
        assert {"src.jpg", "mask.png", "fg.png", "bg.jpg", "depth_fg.png", "depth_bg.png", "txt", "json"} <= s.keys()
    # a triplet shard's index also lists its rejects; nsamples counts what the tar holds
    counts = [sum(r["status"] == "ok" for r in pq.read_table(u[: -len(".tar")] + ".parquet").to_pylist())
              for u in result.shard_urls]
    ds = wids.ShardListDataset([{"url": u, "nsamples": c} for u, c in zip(result.shard_urls, counts)])
    assert len(ds) == n and {ds[i]["__key__"] for i in range(n)} == keys
    rows = ray.data.read_webdataset(str(out / "shards"), file_extensions=["tar"], decoder=None).take_all()
    assert {r["__key__"] for r in rows} == keys and len(rows) == n


def test_contact_sheet_shows_the_first_triplets_column_by_column(triplets):
    from tasks.triplets.preview import COLUMNS

    out, result = triplets
    assert result.preview_url and Path(result.preview_url) == out / "preview.png"
    sheet = Image.open(out / "preview.png").convert("RGB")
    rows = min(4, result.num_triplets)
    assert sheet.size == (128 * len(COLUMNS), 16 + 128 * rows)
    first = next(s for u in result.shard_urls for s in iter_tar_samples(u))
    for c, name in enumerate(COLUMNS):  # row 0 holds the first triplet's files, in the column order
        tile = np.asarray(sheet.crop((c * 128, 16, (c + 1) * 128, 16 + 128)), dtype=float)
        img = Image.open(io.BytesIO(first[name]))
        if img.mode.startswith("I"):
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
        want = np.asarray(img.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR), dtype=float)
        assert np.abs(tile - want).mean() < 1, name


def test_coco_stuff_masks_and_bad_inputs_travel_through_the_whole_chain(tmp_path):
    """COCO-Stuff things masks are the triplet masks; an empty mask, a full-frame object and an
    all-black image end as rejects with their reasons; counts add up from sources to triplets."""
    from tests.fixtures.formats import CocoImage, coco_image, encode, label_png, synthetic_label_map, write_coco_stuff

    w, h = 200, 150
    black = encode(Image.new("RGB", (w, h), "black"))
    entries = [
        coco_image(1, "chelsea.png", (w, h), seed=1),
        coco_image(2, "coffee.png", (w, h), seed=2),
        CocoImage(3, coco_image(3).image, label_png(np.full((h, w), 150, np.uint8)), ("only stuff",), w, h),
        CocoImage(4, coco_image(4).image, label_png(np.zeros((h, w), np.uint8)), ("all person",), w, h),
        CocoImage(5, black, label_png(synthetic_label_map(w, h, 5)), ("a black frame",), w, h),
    ]
    write_coco_stuff(str(tmp_path / "coco"), entries)
    run_ingest("coco-stuff", str(tmp_path / "coco"), str(tmp_path / "ingest"), size=SIZE, shard_size=2,
               executor="local")
    result = run_triplets(str(tmp_path / "ingest"), str(tmp_path / "triplets"), preset="tiny", stages=STAGES,
                          executor="local")
    assert result.num_sources == 5 == result.num_triplets + result.num_rejects
    reasons = {r["source_id"].rsplit("/", 1)[-1]: r["reason"]
               for r in pq.read_table(tmp_path / "triplets" / "rejects.parquet").to_pylist()}
    assert reasons == {"000000000003.jpg": "no_salient_object", "000000000004.jpg": "object_fills_frame",
                       "000000000005.jpg": "blank_image"}
    ingest_masks = {s["__key__"]: s["mask.png"] for u in sorted((tmp_path / "ingest" / "shards").glob("*.tar"))
                    for s in iter_tar_samples(str(u))}
    triplets = [s for u in result.shard_urls for s in iter_tar_samples(u)]
    assert len(triplets) == 2
    for s in triplets:
        assert np.array_equal(decode(s["mask.png"]), decode(ingest_masks[s["__key__"]]))
        assert json.loads(s["json"])["mask_source"] == "labels"


def test_optional_clip_embeddings_and_vae_latents(ingested, tmp_path):
    import torch

    from cnc_model.annotators.clip_embed import decode_npy
    from cnc_model.annotators.latents import LatentEncoder

    result = run_triplets(str(ingested / "ingest"), str(tmp_path / "t"), preset="tiny", stages=STAGES, clip=True,
                          latents=True, executor="local")
    encoder = LatentEncoder.tiny()
    samples = [s for u in result.shard_urls for s in iter_tar_samples(u)]
    assert len(samples) == result.num_triplets > 0
    for s in samples:
        latents = decode_npy(s["latents.npy"])
        assert latents.dtype == np.float16 and latents.shape == (4, SIZE // 8, SIZE // 8)
        # the stage calls the VAE on padded batches of 8; the same call shape gives the same bits
        with torch.no_grad():
            assert np.array_equal(latents, encoder.encode([decode(s["src.jpg"])] * 8)[0])
        fg, bg = decode_npy(s["clip_fg.npy"]), decode_npy(s["clip_bg.npy"])
        assert fg.shape == bg.shape and fg.ndim == 1 and not np.array_equal(fg, bg)


def test_pools_that_cannot_fit_fail_before_the_output_is_claimed(ray_local, ingested, tmp_path):
    from tasks.triplets.resources import ResourceError

    out = tmp_path / "never"
    too_big = {"inpaint": StageOptions(num_cpus=1.0, min_actors=3)}  # the local Ray has 2 CPUs
    with pytest.raises(ResourceError, match="need 3.7 CPUs, the cluster has 2"):
        run_triplets(str(ingested / "ingest"), str(out), preset="tiny", stages=too_big)
    with pytest.raises(ValueError, match="'foreground' runs inside the 'inpaint' actors"):
        run_triplets(str(ingested / "ingest"), str(out), preset="tiny", stages={"foreground": StageOptions(num_cpus=1)})
    assert not (out / "_config.json").exists()  # not claimed: the corrected command runs without --resume
