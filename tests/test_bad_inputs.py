"""The bad-input corpus through the real ingest stage: every input ends as the sample or the
reject (with the reason) it is expected to, counts add up, and nothing kills the run."""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tasks import storage
from tasks.imaging import RejectError, prepare_image
from tasks.ingest import run_ingest, sample_key
from tasks.shards import iter_tar_samples, read_index
from tasks.sources import get_source
from tests.fixtures.bad_inputs import (
    Corpus, build_coco_corpus, build_folder_corpus, build_pickapic_corpus, build_webdataset_corpus,
)
from tests.fixtures.formats import encode, photo

SIZE = 64
BUILDERS = {"folder": build_folder_corpus, "coco-stuff": build_coco_corpus, "pickapic": build_pickapic_corpus,
            "webdataset": build_webdataset_corpus}


def run_corpus(corpus: Corpus, out: str, executor: str) -> tuple[Any, list[dict], dict[str, dict]]:
    result = run_ingest(corpus.format, corpus.url, out, size=SIZE, shard_size=5, executor=executor, **corpus.options)
    rows, samples = [], {}
    for tar_url in result.shard_urls:
        rows += read_index(tar_url[: -len(".tar")] + ".parquet").to_pylist()
        samples.update({s["__key__"]: s for s in iter_tar_samples(tar_url)})
    return result, rows, samples


def check_sample(source_id: str, checks: dict[str, Any], s: dict[str, bytes]) -> None:
    meta = json.loads(s["json"])
    assert meta["source_id"] == source_id
    img = Image.open(io.BytesIO(s["jpg"]))
    assert (img.size, img.mode, img.format) == ((SIZE, SIZE), "RGB", "JPEG")
    px = np.asarray(img, dtype=np.int16)
    caption = s["txt"].decode() if "txt" in s else None
    if "caption" in checks:
        assert caption == checks["caption"]
    if "caption_in" in checks:
        assert caption in checks["caption_in"]
    if "caption_len" in checks:
        assert len(caption) == checks["caption_len"]
    if "caption_flags" in checks:
        assert meta["caption_flags"] == checks["caption_flags"]
    if "orig_size" in checks:
        assert (meta["orig_width"], meta["orig_height"]) == checks["orig_size"]
    if checks.get("gray"):
        assert np.abs(px - px[..., :1]).max() <= 2
    if checks.get("white_left"):
        assert px[:, : SIZE // 2 - 6].min() >= 245
    if "color" in checks:
        assert np.abs(px.reshape(-1, 3).mean(0) - checks["color"]).max() < 6
    if "like" in checks:  # a lossy round trip of a known photo: close to the photo's own crop
        ref = prepare_image(encode(photo(checks["like"], checks["orig_size"]), "PNG"), SIZE).jpeg
        assert np.abs(px - np.asarray(Image.open(io.BytesIO(ref)), dtype=np.int16)).mean() < 6
    if "like_gray" in checks:  # a grayscale rendering of a known photo, whatever its pixel type
        gray = photo(checks["like_gray"], checks["orig_size"]).convert("L")
        ref = prepare_image(encode(gray, "PNG"), SIZE).jpeg
        assert np.abs(px - np.asarray(Image.open(io.BytesIO(ref)), dtype=np.int16)).mean() < 6
    if "like_bytes" in checks:  # the exact bytes of preparing the chosen image
        assert s["jpg"] == prepare_image(checks["like_bytes"], SIZE).jpeg
    if checks.get("mask"):
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        assert (mask == 0).all() if checks.get("mask_empty") else (mask == 255).any()
    else:
        assert "mask.png" not in s


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_corpus_outcomes_exactly_as_expected(fmt, memory_url):
    corpus = BUILDERS[fmt](f"{memory_url}/src")
    result, rows, samples = run_corpus(corpus, f"{memory_url}/out", executor="local")

    expected = Counter((sid, e.outcome, e.reason) for sid, e in corpus.entries)
    got = Counter((r["source_id"], "sample" if r["status"] == "ok" else "reject", r["reason"]) for r in rows)
    assert got == expected
    n = len(corpus.entries)
    assert (result.num_inputs, result.num_samples + result.num_rejects) == (n, n)
    assert result.rejects_by_reason == dict(Counter(e.reason for _, e in corpus.entries if e.outcome == "reject"))
    manifest = storage.read_json(f"{memory_url}/out/manifest.json")
    assert manifest["counts"]["inputs"] == n
    assert len(samples) == result.num_samples
    for sid, e in corpus.entries:
        if e.outcome == "sample":
            check_sample(sid, e.checks, samples[sample_key(sid)])


def test_corpus_covers_enough_kinds(tmp_path):
    kinds = set()
    for fmt, build in BUILDERS.items():
        kinds |= build(str(tmp_path / fmt)).kinds
    assert len(kinds) >= 40
    folder_kinds = build_folder_corpus(str(tmp_path / "again")).kinds
    assert len(folder_kinds) >= 30


def test_image_flags_of_folder_corpus(memory_url):
    """The flags prepare_image reports for the odd images (CMYK, 16-bit, alpha, frames, EXIF)."""
    corpus = build_folder_corpus(memory_url)
    source = get_source("folder", memory_url)
    refs = [sid for sid, _ in corpus.entries]
    items = list(source.load(refs))
    assert [item.source_id for item in items] == refs  # one item per entry, in order: no silent zip cut
    rejects_checked = flags_checked = 0
    for (sid, e), item in zip(corpus.entries, items):
        if e.outcome == "reject" and item.error is None:
            with pytest.raises(RejectError) as info:
                prepare_image(item.image or b"", SIZE)
            assert info.value.reason == e.reason
            rejects_checked += 1
        if "flags" in e.checks:
            assert set(e.checks["flags"]) <= set(prepare_image(item.image, 256).flags), sid
            flags_checked += 1
    assert rejects_checked > 0 and flags_checked > 0


@pytest.mark.slow
def test_all_corpora_on_ray(tmp_path, monkeypatch):
    """The same corpora through Ray Data workers, on local files."""
    monkeypatch.setenv("CNC_RAY_DASHBOARD", "0")
    for fmt, build in BUILDERS.items():
        corpus = build(str(tmp_path / fmt / "src"))
        result, rows, samples = run_corpus(corpus, str(tmp_path / fmt / "out"), executor="ray")
        expected = Counter((sid, e.outcome, e.reason) for sid, e in corpus.entries)
        got = Counter((r["source_id"], "sample" if r["status"] == "ok" else "reject", r["reason"]) for r in rows)
        assert got == expected, fmt
        assert result.num_samples + result.num_rejects == result.num_inputs == len(corpus.entries)
        for sid, e in corpus.entries:
            if e.outcome == "sample":
                check_sample(sid, e.checks, samples[sample_key(sid)])


def test_hostile_local_folder_reads_nothing_outside_its_root_and_never_blocks(tmp_path):
    """Links out of the root, FIFOs, devices and oversize files: each a reject with its reason,
    the credentials file a caption links to reaches no output, and nothing blocks (the run happens
    in a thread that must finish within a deadline)."""
    import threading

    from tests.fixtures.bad_inputs import SECRET, build_hostile_folder_corpus

    corpus = build_hostile_folder_corpus(str(tmp_path / "src"), str(tmp_path / "outside"))
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(
        run=run_corpus(corpus, str(tmp_path / "out"), executor="local")), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "ingest blocked on a special file"
    result, rows, samples = outcome["run"]
    expected = Counter((sid, e.outcome, e.reason) for sid, e in corpus.entries)
    got = Counter((r["source_id"], "sample" if r["status"] == "ok" else "reject", r["reason"]) for r in rows)
    assert got == expected
    assert result.num_samples + result.num_rejects == result.num_inputs == len(corpus.entries)
    secret = SECRET.encode()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    assert all(SECRET not in (r["caption"] or "") for r in rows)


def test_a_label_map_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    from PIL import ImageFile

    from tasks.imaging import prepare_label_map
    from tests.fixtures.bad_inputs import bomb_png
    from tests.fixtures.formats import photo_jpeg

    prepared = prepare_image(photo_jpeg("rocket.jpg", (200, 150)), SIZE)
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(RejectError) as info:
        prepare_label_map(bomb_png(12_000, 10_000), prepared)
    assert info.value.reason == "label_map_size_mismatch"
    assert (12_000, 10_000) not in decoded
