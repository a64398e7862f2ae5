"""Source readers: listing, one item per ref in order, captions, validation, streaming reads."""

from __future__ import annotations

import io
import json
import random

import pyarrow.parquet as pq
import pytest

from tasks import storage
from tasks.sources import SOURCE_FORMATS, get_source
from tasks.sources.base import SourceError
from tasks.sources.captions import clean_caption
from tasks.sources.coco_stuff import pick_caption_index
from tasks.sources.pickapic import is_nsfw_prompt, parse_ref, row_verdict
from tasks.sources.webdataset_source import split_member
from tests.fixtures.formats import (
    PickapicPair, coco_image, photo_jpeg, write_coco_stuff, write_folder, write_pickapic, write_webdataset,
)


def test_registry_knows_the_four_formats_and_rejects_others():
    assert SOURCE_FORMATS == ("folder", "coco-stuff", "pickapic", "webdataset")
    for fmt in SOURCE_FORMATS:
        assert get_source(fmt, "memory://nowhere").format_name == fmt
    with pytest.raises(SourceError, match="unknown source format 'laion'"):
        get_source("laion", "memory://x")
    with pytest.raises(SourceError, match="unknown option"):
        get_source("folder", "memory://x", split="train")


@pytest.mark.parametrize(("raw", "text", "flags"), [
    (None, None, ["missing"]),
    (b"  a cat \n", "a cat", []),
    ("", None, ["empty"]),
    (b"\xef\xbb\xbfbom", "bom", []),
    (b"caf\xe9", "caf\ufffd", ["not_utf8"]),
    ("a\x00b\x07c\nd", "abc\nd", ["control_chars"]),
    (b"\x00\x00", None, ["control_chars", "empty"]),
])
def test_clean_caption(raw, text, flags):
    assert clean_caption(raw) == (text, flags)


# ----------------------------------------------------------------------------------- folder

@pytest.fixture
def folder(memory_url):
    jpg = photo_jpeg()
    write_folder(memory_url, {"b.jpg": jpg, "a.PNG": jpg, "sub/c.webp": jpg, "notes.md": b"x", ".hidden.jpg": jpg,
                              ".cache/d.jpg": jpg, "e f [1].jpeg": jpg},
                 {"b.jpg": "caption b", "e f [1].jpeg": "spaces and brackets"})
    return memory_url


def test_folder_lists_images_sorted_and_skips_hidden_and_others(folder):
    assert list(get_source("folder", folder).list_refs()) == ["a.PNG", "b.jpg", "e f [1].jpeg", "sub/c.webp"]


def test_folder_loads_one_item_per_ref_in_any_order(folder):
    source = get_source("folder", folder)
    refs = ["sub/c.webp", "missing.jpg", "b.jpg", "e f [1].jpeg", "b.jpg"] + ["a.PNG"] * 20
    items = list(source.load(refs))
    assert [i.source_id for i in items] == refs
    assert items[1].error == "missing_file" and items[1].image is None
    assert items[2].caption == "caption b" and items[2].image == photo_jpeg()
    assert items[3].caption == "spaces and brackets"
    assert items[0].caption is None and items[0].meta == {"caption_flags": ["missing"]}
    assert all(i.error is None for i in items if i.source_id != "missing.jpg")


def test_folder_works_on_local_paths_and_file_urls(tmp_path):
    write_folder(str(tmp_path), {"x.jpg": photo_jpeg()}, {"x.jpg": "local"})
    for url in (str(tmp_path), f"file://{tmp_path}"):
        source = get_source("folder", url)
        source.validate()
        assert [(i.source_id, i.caption) for i in source.load(list(source.list_refs()))] == [("x.jpg", "local")]


def test_folder_validation_errors(memory_url, tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        get_source("folder", f"{memory_url}/none").validate()
    write_folder(memory_url, {"readme.txt": b"no images"})
    with pytest.raises(SourceError, match="holds no images"):
        get_source("folder", memory_url).validate()
    (tmp_path / "file.jpg").write_bytes(photo_jpeg())
    with pytest.raises(SourceError, match="not a folder"):
        get_source("folder", str(tmp_path / "file.jpg")).validate()


def test_folder_caps_bytes_read_per_file_on_object_stores_too(memory_url):
    jpg = photo_jpeg()
    write_folder(memory_url, {"small.jpg": jpg, "big.jpg": jpg + b"\0" * 5000, "long.jpg": jpg},
                 {"long.jpg": "x" * 3000, "small.jpg": "short"})
    source = get_source("folder", memory_url, max_file_bytes=len(jpg) + 100, max_caption_bytes=2000)
    items = {i.source_id: i for i in source.load(["big.jpg", "long.jpg", "small.jpg"])}
    assert items["big.jpg"].error == "file_too_large"
    assert items["long.jpg"].error == "caption_file_too_large"
    assert (items["small.jpg"].error, items["small.jpg"].image, items["small.jpg"].caption) == (None, jpg, "short")
    assert source.describe()["options"] == {"max_file_bytes": len(jpg) + 100, "max_caption_bytes": 2000}
    assert get_source("folder", memory_url).describe()["options"] == {}  # defaults keep old manifests equal


def test_folder_unreadable_files_are_per_file_rejects(tmp_path, monkeypatch):
    """EACCES on an image or on its caption rejects that item only (simulated: the tests run as root)."""
    import errno
    import os

    jpg = photo_jpeg()
    write_folder(str(tmp_path), {"a.jpg": jpg, "b.jpg": jpg, "c.jpg": jpg}, {"b.jpg": "b", "c.jpg": "c"})
    real_open = os.open

    def no_access(path, flags, *args):
        if os.path.basename(path) in ("a.jpg", "c.txt"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_access)
    items = list(get_source("folder", str(tmp_path)).load(["a.jpg", "b.jpg", "c.jpg"]))
    assert [i.error for i in items] == ["read_error: PermissionError", None, "caption_read_error: PermissionError"]
    assert (items[1].image, items[1].caption) == (jpg, "b")


def test_folder_transient_read_errors_fail_the_shard_and_a_retry_loses_nothing(tmp_path, monkeypatch):
    """A network-like error on one file is not a reject (a re-run would skip it for good): it fails
    the shard, and the runner's next attempt reads every file. A permanent one stays a reject with
    its exception as the detail."""
    import errno
    import os

    from tasks.ingest import run_ingest
    from tasks.shards import read_index

    jpg = photo_jpeg()
    src = tmp_path / "src"
    write_folder(str(src), {"a.jpg": jpg, "b.jpg": jpg, "c.jpg": jpg}, {})
    real_open = os.open
    failures = {"b.jpg": 1}

    def flaky(path, flags, *args, **kwargs):
        name = os.path.basename(path)
        if failures.get(name):
            failures[name] -= 1
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer", path)
        if name == "c.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", flaky)
    with pytest.raises(ConnectionResetError):
        list(get_source("folder", str(src)).load(["a.jpg", "b.jpg", "c.jpg"]))
    failures["b.jpg"] = 1
    result = run_ingest("folder", str(src), str(tmp_path / "out"), size=32, min_side=8, shard_size=3,
                        executor="local")
    assert (result.num_samples, result.num_rejects) == (2, 1) and failures["b.jpg"] == 0
    rows = read_index(str(tmp_path / "out" / "shards" / "shard-000000.parquet")).to_pylist()
    rejected = [r for r in rows if r["status"] != "ok"]
    assert [(r["source_id"], r["reason"], r["retryable"]) for r in rejected] == \
        [("c.jpg", "read_error: PermissionError", False)]
    assert "Permission denied" in rejected[0]["detail"]


# ------------------------------------------------------------------------------- COCO-Stuff

def test_caption_pick_is_deterministic_seeded_and_spread():
    picks = [pick_caption_index(i, 5) for i in range(200)]
    assert picks == [pick_caption_index(i, 5) for i in range(200)]
    assert set(picks) == {0, 1, 2, 3, 4}
    assert picks != [pick_caption_index(i, 5, seed=1) for i in range(200)]


@pytest.fixture
def coco(memory_url):
    caps = [f"caption {k}" for k in range(5)]
    entries = [coco_image(i, captions=caps, seed=i) for i in (30, 10, 20)]
    write_coco_stuff(memory_url, entries, split="train2017")
    return memory_url, entries


def test_coco_lists_by_image_id_and_loads_image_label_and_caption(coco):
    url, entries = coco
    source = get_source("coco-stuff", url)  # the split is found from annotations/captions_*.json
    source.validate()
    refs = list(source.list_refs())
    assert refs == [f"train2017/{i:012d}.jpg" for i in (10, 20, 30)]
    by_id = {e.image_id: e for e in entries}
    for item in source.load(refs):
        image_id = int(item.source_id.split("/")[1][:12])
        assert (item.image, item.label_map) == (by_id[image_id].image, by_id[image_id].label)
        k = pick_caption_index(image_id, 5, 0)
        assert item.caption == f"caption {k}"
        assert item.meta == {"coco_image_id": image_id, "split": "train2017", "caption_index": k}


def test_coco_label_maps_in_the_readme_layout(memory_url):
    entry = coco_image(5)
    write_coco_stuff(memory_url, [entry], split="val2017", label_dir="annotations")
    for options in ({}, {"label_dir": "annotations"}):
        source = get_source("coco-stuff", memory_url, **options)
        source.validate()
        assert [i.label_map for i in source.load(list(source.list_refs()))] == [entry.label]
    with pytest.raises(SourceError, match="no stuffthingmaps/val2017/ folder"):
        get_source("coco-stuff", memory_url, label_dir="stuffthingmaps").validate()


def test_coco_caption_choice_ignores_annotation_order_and_follows_the_seed(coco):
    url, _ = coco
    path = f"{url}/annotations/captions_train2017.json"
    doc = storage.read_json(path)
    before = [i.caption for i in get_source("coco-stuff", url).load(["train2017/000000000010.jpg"])]
    random.Random(0).shuffle(doc["annotations"])
    storage.write_bytes(path, json.dumps(doc).encode())
    after = [i.caption for i in get_source("coco-stuff", url).load(["train2017/000000000010.jpg"])]
    assert before == after
    seeded = [get_source("coco-stuff", url, caption_seed=s).load(["train2017/000000000010.jpg"]) for s in range(8)]
    assert len({next(it).caption for it in seeded}) > 1


def test_coco_validation_errors(memory_url):
    with pytest.raises(SourceError, match="does not exist"):
        get_source("coco-stuff", memory_url).validate()
    write_coco_stuff(memory_url, [coco_image(1)], split="val2017")
    write_coco_stuff(memory_url, [coco_image(2)], split="train2017")
    with pytest.raises(SourceError, match="pass split="):
        get_source("coco-stuff", memory_url).validate()
    get_source("coco-stuff", memory_url, split="val2017").validate()
    with pytest.raises(SourceError, match="no annotations/captions_test2017.json"):
        storage.makedirs(f"{memory_url}/images/test2017")
        storage.write_bytes(f"{memory_url}/images/test2017/x.jpg", b"")
        storage.write_bytes(f"{memory_url}/stuffthingmaps/test2017/x.png", b"")
        get_source("coco-stuff", memory_url, split="test2017").validate()
    storage.write_bytes(f"{memory_url}/annotations/captions_val2017.json", b'{"info": {}}')
    with pytest.raises(SourceError, match="COCO captions schema"):
        get_source("coco-stuff", memory_url, split="val2017").validate()


@pytest.mark.parametrize(("name", "safe"), [
    ("000000000009.jpg", True), ("sub/x.jpg", True), ("../x.jpg", False), ("a/../../x.jpg", False),
    ("/etc/passwd", False), ("a//b.jpg", False), ("./a.jpg", False), ("a\\..\\b.jpg", False), ("a\x00.jpg", False),
    ("", False), ("..", False),
])
def test_coco_file_names_must_stay_in_the_split_folder(name, safe):
    from tasks.sources.coco_stuff import is_safe_file_name

    assert is_safe_file_name(name) is safe


# ------------------------------------------------------------------------------- Pick-a-Pic

def test_row_verdict_keeps_only_the_preferred_image_of_a_clean_labelled_pair():
    row = {"caption": "a cat on a red sofa", "has_label": True, "label_0": 0.0, "label_1": 1.0,
           "image_0_uid": "u0", "image_1_uid": "u1"}
    assert row_verdict(row) == (1, "u1", None)
    assert row_verdict({**row, "label_0": 1.0, "label_1": 0.0}) == (0, "u0", None)
    assert row_verdict({**row, "label_0": 0.5, "label_1": 0.5})[2] == "tied_pair"
    assert row_verdict({**row, "has_label": False})[2] == "unlabelled_pair"
    assert row_verdict({**row, "label_0": None})[2] == "unlabelled_pair"
    assert row_verdict({**row, "caption": "a NUDE cat on a sofa"})[2] == "nsfw_caption"
    assert row_verdict({**row, "caption": "a nude cat on a sofa"}, nsfw_filter=False)[2] is None
    assert row_verdict({**row, "caption": "two words"})[2] == "caption_too_short"
    assert row_verdict({**row, "caption": "two words"}, min_caption_words=0)[2] is None
    assert row_verdict({**row, "image_1_uid": None})[2] == "missing_image_uid"


def test_official_selection_keeps_jpg_1_on_ties_as_parse_pickapic(memory_url):
    """data/parse_pickapic.py: jpg_0 if label_0 > label_1 else jpg_1 (ties, unlabelled pairs too);
    captions split on whitespace after removing ':'."""
    from tasks.sources.pickapic import official_row_verdict

    row = {"caption": "a cat on a red sofa", "has_label": True, "label_0": 0.0, "label_1": 1.0,
           "image_0_uid": "u0", "image_1_uid": "u1"}
    assert official_row_verdict({**row, "label_0": 1.0, "label_1": 0.0}) == (0, "u0", None)
    assert official_row_verdict({**row, "label_0": 0.5, "label_1": 0.5}) == (1, "u1", None)
    assert official_row_verdict({**row, "has_label": False, "label_0": 0.0, "label_1": 0.0}) == (1, "u1", None)
    assert official_row_verdict({**row, "label_0": float("nan")}) == (1, "u1", None)
    assert official_row_verdict({**row, "label_0": None}) == (1, "u1", None)
    assert official_row_verdict({**row, "caption": "red-cube:sofa"})[2] == "caption_too_short"  # one word
    assert row_verdict({**row, "caption": "red-cube:sofa"})[2] is None  # ours counts 3 words
    assert official_row_verdict({**row, "caption": "a NUDE cat on a sofa"})[2] == "nsfw_caption"
    tie = [PickapicPair("a tie between two pictures", b"0", b"1", 0.5, 0.5, image_0_uid="t0", image_1_uid="t1"),
           PickapicPair("an unlabelled pair of pictures", b"0", b"1", 0.0, 0.0, has_label=False,
                        image_0_uid="n0", image_1_uid="n1")]
    write_pickapic(f"{memory_url}/p.parquet", tie)
    assert list(get_source("pickapic", memory_url, selection="official").list_refs()) == ["p.parquet:0:t1", "p.parquet:1:n1"]
    assert list(get_source("pickapic", memory_url).list_refs()) == ["p.parquet:0", "p.parquet:1"]  # rejected
    assert "selection" not in get_source("pickapic", memory_url).describe()["options"]
    with pytest.raises(SourceError, match="selection"):
        get_source("pickapic", memory_url, selection="best")


def test_nsfw_prompt_matches_words_not_substrings():
    assert is_nsfw_prompt("Portrait, NSFW, oil painting")
    assert is_nsfw_prompt("a 女 portrait")
    assert not is_nsfw_prompt("a glass of water on a table")  # 'ass' inside 'glass'
    assert not is_nsfw_prompt("a classic sedan in the rain")


def pairs(n: int, tag: str = "f") -> list[PickapicPair]:
    imgs = [photo_jpeg(name, (96, 96)) for name in ("chelsea.png", "astronaut.png")]
    return [PickapicPair(f"prompt number {i} for a picture", imgs[0], imgs[1], float(i % 2), float(1 - i % 2),
                         image_0_uid=f"{tag}-{i}-0", image_1_uid=f"{tag}-{i}-1") for i in range(n)]


def test_pickapic_lists_rows_in_file_order_and_loads_the_winner(memory_url):
    write_pickapic(f"{memory_url}/b.parquet", pairs(3, "b"))
    write_pickapic(f"{memory_url}/a.parquet", pairs(2, "a"))
    source = get_source("pickapic", memory_url)
    source.validate()
    refs = list(source.list_refs())
    assert [parse_ref(r)[:2] for r in refs] == [("a.parquet", 0), ("a.parquet", 1), ("b.parquet", 0),
                                                 ("b.parquet", 1), ("b.parquet", 2)]
    winners = [photo_jpeg("astronaut.png", (96, 96)), photo_jpeg("chelsea.png", (96, 96))]
    for k, item in enumerate(source.load(refs)):
        row = parse_ref(refs[k])[1]
        assert item.error is None and item.image == winners[row % 2]
        assert item.caption == f"prompt number {row} for a picture"
        assert item.meta["preferred"] == 1 - row % 2 and item.meta["image_uid"] == parse_ref(refs[k])[2]


def test_pickapic_repeated_winner_repeats_the_first_source_id(memory_url):
    write_pickapic(f"{memory_url}/b.parquet", pairs(2, "same"))
    write_pickapic(f"{memory_url}/a.parquet", pairs(2, "same"))
    refs = list(get_source("pickapic", memory_url).list_refs())
    assert refs == ["a.parquet:0:same-0-1", "a.parquet:1:same-1-0"] * 2


def test_pickapic_single_file_url(memory_url):
    write_pickapic(f"{memory_url}/one.parquet", pairs(2))
    source = get_source("pickapic", f"{memory_url}/one.parquet")
    refs = list(source.list_refs())
    assert [parse_ref(r)[:2] for r in refs] == [("one.parquet", 0), ("one.parquet", 1)]
    assert [i.error for i in source.load(refs)] == [None, None]


def test_pickapic_reads_only_the_row_groups_it_needs(memory_url, monkeypatch):
    write_pickapic(f"{memory_url}/p.parquet", pairs(12), row_group_size=4)
    source = get_source("pickapic", memory_url)
    refs = list(source.list_refs())
    read = []
    original = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, columns=None, **kwargs):
        if row_groups is not None and any(c.startswith("jpg_") for c in columns):  # the image reads
            read.extend((i, tuple(columns)) for i in row_groups)
        return original(self, batch_size=batch_size, row_groups=row_groups, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    items = list(source.load(refs[5:7]))
    assert [i.source_id for i in items] == refs[5:7]
    assert [g for g, _ in read] == [1]
    assert not {"image_0_url", "created_at", "user_id"} & set(read[0][1])
    assert {c for c in read[0][1] if c.startswith("jpg_")} == {"jpg_0", "jpg_1"}  # rows 5 and 6 differ
    read.clear()
    assert [i.image for i in source.load([refs[4]])] == [photo_jpeg("astronaut.png", (96, 96))]  # row 4: side 1
    assert [c for c in read[0][1] if c.startswith("jpg_")] == ["jpg_1"]  # only the preferred side's column
    read.clear()
    shuffled = [refs[9], refs[0], refs[10]]
    assert [i.source_id for i in source.load(shuffled)] == shuffled
    assert [g for g, _ in read] == [2, 0, 2]


def test_pickapic_memory_does_not_grow_with_the_row_group(tmp_path):
    """One row group of 160 pairs of 100 KB images: loading three rows decodes a few at a time."""
    import os

    import pyarrow as pa

    blob = lambda i: os.urandom(100_000)  # noqa: E731
    big = [PickapicPair(f"a photo number {i} of a cat", blob(i), blob(i), 1.0, 0.0) for i in range(160)]
    from tests.fixtures.formats import PICKAPIC_SCHEMA, pickapic_row

    table = pa.Table.from_pylist([pickapic_row(p, i) for i, p in enumerate(big)], schema=PICKAPIC_SCHEMA)
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=160, use_dictionary=["caption"],
                   write_batch_size=8, data_page_size=256_000)
    del table
    source = get_source("pickapic", str(tmp_path))
    refs = list(source.list_refs())
    default = pa.default_memory_pool()
    pool = _PROXY_POOLS.setdefault("pickapic", pa.proxy_memory_pool(default))  # outlives every buffer it made
    pa.set_memory_pool(pool)
    try:
        items = list(source.load(refs[100:103]))
    finally:
        pa.set_memory_pool(default)
    assert [i.image for i in items] == [big[i].jpg_0 for i in range(100, 103)]
    assert pool.max_memory() < 8 << 20, pool.max_memory()  # the row group's image columns are 32 MB


_PROXY_POOLS: dict = {}


def test_pickapic_validation_errors(memory_url):
    with pytest.raises(SourceError, match="does not exist"):
        get_source("pickapic", memory_url).validate()
    storage.write_bytes(f"{memory_url}/readme.md", b"x")
    with pytest.raises(SourceError, match="no .parquet files"):
        get_source("pickapic", memory_url).validate()
    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table({"caption": ["x"]}), buf)
    storage.write_bytes(f"{memory_url}/bad.parquet", buf.getvalue())
    with pytest.raises(SourceError, match="lacks column"):
        get_source("pickapic", memory_url).validate()


# ------------------------------------------------------------------------------- WebDataset

def test_split_member_follows_webdataset_keys():
    assert split_member("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_member("000001.jpg") == ("000001", "jpg")
    assert split_member("noext") is None


@pytest.fixture
def shards(memory_url):
    jpg = photo_jpeg()
    write_webdataset(f"{memory_url}/s-000001.tar", [("k3", {"jpg": jpg, "txt": b"three"})])
    write_webdataset(f"{memory_url}/s-000000.tar", [("k1", {"jpg": jpg, "txt": b"one"}),
                                                      ("k2", {"png": jpg, "cls": b"7"})])
    return memory_url


def test_webdataset_lists_tars_sorted_and_members_in_tar_order(shards):
    source = get_source("webdataset", shards)
    source.validate()
    assert list(source.list_refs()) == ["s-000000.tar/k1", "s-000000.tar/k2", "s-000001.tar/k3"]
    assert list(get_source("webdataset", f"{shards}/s-{{000000..000001}}.tar").list_refs()) == \
        list(source.list_refs())
    assert list(get_source("webdataset", f"{shards}/s-000001.tar").list_refs()) == ["s-000001.tar/k3"]


def test_webdataset_loads_one_item_per_ref_even_out_of_order(shards):
    source = get_source("webdataset", shards)
    refs = ["s-000001.tar/k3", "s-000000.tar/k2", "s-000000.tar/nope", "s-000000.tar/k1", "s-000000.tar/k1",
            "gone.tar/k9"]
    items = list(source.load(refs))
    assert [i.source_id for i in items] == refs
    assert [i.caption for i in items] == ["three", None, None, "one", "one", None]
    assert [i.error for i in items] == [None, None, "missing_in_tar", None, None, "missing_file"]
    assert items[1].image == photo_jpeg() and items[1].meta["original_ext"] == "png"


def test_webdataset_validation_errors(memory_url):
    with pytest.raises(SourceError, match="no .tar shards"):
        get_source("webdataset", memory_url).validate()
    storage.write_bytes(f"{memory_url}/x.tar", b"not a tar" * 100)
    with pytest.raises(SourceError, match="not a tar"):
        get_source("webdataset", memory_url).validate()


def test_webdataset_memory_stays_bounded_in_the_member_count(tmp_path):
    """Listing and loading a tar of 10,000 one-file samples holds no header it has passed."""
    import io
    import tarfile
    import tracemalloc

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("")
        info.size = 1
        for i in range(10_000):
            info.name = f"{i:06d}.cls"
            tar.addfile(info, io.BytesIO(b"7"))
    (tmp_path / "many.tar").write_bytes(buf.getvalue())
    del buf
    source = get_source("webdataset", str(tmp_path))
    tracemalloc.start()
    try:
        count = sum(1 for _ in source.list_refs())
        listed_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        errors = {item.error for item in source.load([f"many.tar/{i:06d}" for i in range(0, 10_000, 7)])}
        loaded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 10_000 and errors == {"missing_image"}
    # each retained TarInfo costs ~450 bytes: 10,000 of them would be ~4.5 MB
    assert listed_peak < 1 << 20 and loaded_peak < 1 << 20, (listed_peak, loaded_peak)


def _wds_samples(n: int, tag: str = "k") -> list[tuple[str, dict[str, bytes]]]:
    names = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")
    return [(f"{tag}{i}", {"jpg": photo_jpeg(names[i % len(names)], quality=70 + i), "txt": f"caption {i}".encode(),
                           "json": json.dumps({"i": i}).encode()}) for i in range(n)]


def _items(items) -> list[tuple]:
    return [(i.source_id, i.image, i.caption, i.meta, i.error) for i in items]


def test_webdataset_listing_locates_samples_and_located_loading_reads_only_their_bytes(tmp_path):
    write_webdataset(str(tmp_path / "a.tar"), _wds_samples(6))
    source = get_source("webdataset", str(tmp_path))
    entries = list(source.list_entries())
    refs, where = [r for r, _ in entries], [w for _, w in entries]
    assert refs == [f"a.tar/k{i}" for i in range(6)] == list(source.list_refs())
    # block-aligned, contiguous spans in tar order, each starting at its sample's first header
    assert all(w[0] % 512 == 0 and w[1] % 512 == 0 and w[0] < w[1] for w in where)
    assert [w[1] for w in where[:-1]] == [w[0] for w in where[1:]] and where[0][0] == 0
    expected = _items(source.load(refs[3:5]))
    assert [e[2] for e in expected] == ["caption 3", "caption 4"] and all(e[4] is None for e in expected)
    assert _items(source.load_located(refs[3:5], where[3:5])) == expected
    # wipe every byte outside samples 3 and 4: the located read does not notice, a front-to-back read does
    data = bytearray((tmp_path / "a.tar").read_bytes())
    keep = bytes(data[where[3][0]:where[4][1]])
    data[:] = bytes(len(data))
    data[where[3][0]:where[4][1]] = keep
    (tmp_path / "a.tar").write_bytes(bytes(data))
    assert _items(source.load_located(refs[3:5], where[3:5])) == expected
    assert [i.error for i in source.load(refs[3:5])] == ["missing_in_tar", "missing_in_tar"]


def test_webdataset_located_loading_reads_a_changed_tar_front_to_back(tmp_path):
    write_webdataset(str(tmp_path / "a.tar"), _wds_samples(4))
    source = get_source("webdataset", str(tmp_path))
    refs, where = zip(*source.list_entries())
    write_webdataset(str(tmp_path / "a.tar"), _wds_samples(1, tag="new") + _wds_samples(4))  # shifts every sample
    got = _items(source.load_located(list(refs[1:]), list(where[1:])))
    assert got == _items(source.load(list(refs[1:])))
    assert [g[2] for g in got] == ["caption 1", "caption 2", "caption 3"]


def test_webdataset_compressed_tars_and_rejected_samples_have_no_location(tmp_path):
    import gzip

    write_webdataset(str(tmp_path / "plain.tar"), _wds_samples(2))
    (tmp_path / "zipped.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    big = _wds_samples(1, tag="big")
    big[0][1]["bin"] = bytes(200_000)
    write_webdataset(str(tmp_path / "with-big.tar"), _wds_samples(1) + big)
    entries = dict(get_source("webdataset", str(tmp_path), max_member_bytes=100_000).list_entries())
    assert [k for k, w in entries.items() if w is None] == ["with-big.tar/big0", "zipped.tar.gz/k0",
                                                            "zipped.tar.gz/k1"]


def test_ingest_of_webdataset_shards_is_the_same_with_and_without_locations(tmp_path, monkeypatch):
    from tasks.ingest import run_ingest
    from tasks.sources.webdataset_source import WebDatasetSource

    write_webdataset(str(tmp_path / "src" / "a.tar"), _wds_samples(7))
    write_webdataset(str(tmp_path / "src" / "b.tar"), _wds_samples(3, tag="b"))
    loaded: list[str] = []
    spy = WebDatasetSource._load_ranges

    def ranges(self, path, refs, spans):
        loaded.extend(refs)
        return spy(self, path, refs, spans)

    monkeypatch.setattr(WebDatasetSource, "_load_ranges", ranges)
    located = run_ingest("webdataset", str(tmp_path / "src"), str(tmp_path / "located"), size=32, shard_size=3,
                         executor="local")
    assert len(loaded) == 10  # every sample was read by its location
    listing = WebDatasetSource.list_entries
    monkeypatch.setattr(WebDatasetSource, "list_entries",  # a listing without locations
                        lambda self: ((ref, None) for ref, _ in listing(self)))
    streamed = run_ingest("webdataset", str(tmp_path / "src"), str(tmp_path / "streamed"), size=32, shard_size=3,
                          executor="local")
    assert located.num_samples == streamed.num_samples == 10 and len(loaded) == 10
    for name in ("shards/shard-000000.tar", "shards/shard-000001.parquet", "shards/shard-000003.tar"):
        assert (tmp_path / "located" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()


# ------------------------------------------------------------------------------------ on S3

@pytest.fixture(scope="module")
def s3_url():
    """A bucket on moto's S3-compatible server on loopback (the real protocol, through s3fs)."""
    import os
    import socket
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"sources-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["S3_ENDPOINT_URL"]}).mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_every_source_reads_the_same_from_s3_as_from_memory(s3_url, memory_url):
    from tests.fixtures.bad_inputs import (
        build_coco_corpus, build_folder_corpus, build_pickapic_corpus, build_webdataset_corpus,
    )

    for build in (build_folder_corpus, build_coco_corpus, build_pickapic_corpus, build_webdataset_corpus):
        on_s3 = build(f"{s3_url}/{build.__name__}")
        in_memory = build(f"{memory_url}/{build.__name__}")
        items = []
        for corpus in (on_s3, in_memory):
            source = get_source(corpus.format, corpus.url, **corpus.options)
            source.validate()
            refs = list(source.list_refs())
            assert refs == [sid for sid, _ in corpus.entries]
            items.append([(i.source_id, i.image, i.caption, i.label_map, i.error) for i in source.load(refs)])
        assert items[0] == items[1], build.__name__
