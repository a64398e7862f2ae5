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


@pytest.mark.parametrize("root", ["memory://storage-abort-{uid}", "{tmp}"])
def test_a_failed_write_leaves_the_old_object_whole_and_nothing_else(root, tmp_path):
    import uuid

    base = root.format(tmp=tmp_path, uid=uuid.uuid4().hex[:8])
    url = storage.join(base, "f.bin")
    storage.write_bytes(url, b"old committed object")
    with pytest.raises(ValueError):
        with storage.atomic_open(url) as fh:
            fh.write(b"new but half")
            assert storage.read_bytes(url) == b"old committed object"  # not visible while written
            raise ValueError("crash")
    assert storage.read_bytes(url) == b"old committed object"
    fs, path = storage.get_fs(base)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] == ["f.bin"]


def test_local_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    url = str(tmp_path / "shard.tar")
    with storage.atomic_open(url) as fh:
        fh.write(b"tar bytes")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert ".shard.tar.tmp-" in events[0][1]
    assert events[1][1] == url and events[2][1] == str(tmp_path)
