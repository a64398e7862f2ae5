"""Atomic writes and URL handling across local, file:// and memory:// storage."""

from __future__ import annotations

import pytest

from tasks import storage


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    url = str(tmp_path / "sub" / "f.bin")
    with pytest.raises(ValueError):
        with storage.atomic_open(url) as fh:
            fh.write(b"half")
            raise ValueError("crash")
    assert not storage.exists(url)
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_open_replaces_whole(tmp_path):
    url = str(tmp_path / "f.bin")
    storage.write_bytes(url, b"old")
    storage.write_bytes(url, b"new content")
    assert storage.read_bytes(url) == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("root", ["{memory}", "file://{tmp}", "{tmp}"])
def test_json_round_trip_and_listing(root, tmp_path, memory_url):
    root = root.format(tmp=tmp_path, memory=memory_url)
    storage.write_json(storage.join(root, "b.json"), {"x": 1})
    storage.write_json(storage.join(root, "a.json"), {"y": [1, 2]})
    storage.write_bytes(storage.join(root, ".hidden.json"), b"{}")
    assert storage.read_json(storage.join(root, "a.json")) == {"y": [1, 2]}
    listed = storage.list_files(root, ".json")
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["a.json", "b.json"]
    assert storage.read_json(listed[1]) == {"x": 1}


def test_check_writable_fails_with_a_clear_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(OSError, match="not writable"):
        storage.check_writable(str(blocker / "out"))
    storage.check_writable(str(tmp_path / "ok"))
