"""Existing WebDataset shards: plain ``.tar`` files of ``<key>.<ext>`` members.

The URL is a folder of ``.tar`` files, one ``.tar`` file, or a brace pattern
(``shards/data-{000..009}.tar``). Members are grouped into samples the WebDataset way: the key is
the member path up to the first dot of its file name, and consecutive members with the same key
form one sample. The image is the first member with an image extension (in
:data:`IMAGE_EXTENSIONS` order), the caption the ``txt`` member.

Source ids are ``<tar name>/<key>``, in tar order. A key that occurs again later in the same tar
is listed again, and the ingest plan rejects it as ``duplicate_source_id``. Listing reads only the
tar headers (it seeks past the data); loading streams each tar once, front to back.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from tasks import storage
from tasks.sources.base import Source, SourceError, SourceItem
from tasks.sources.captions import caption_meta, clean_caption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.(.*)$")


def split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: ``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``); None if no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def _groups(tar: tarfile.TarFile, with_data: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each run of consecutive members sharing a key."""
    key, files = None, {}
    for info in tar:
        if not info.isfile():
            continue
        parts = split_member(info.name)
        if parts is None or posixpath.basename(parts[0]).startswith("."):
            continue
        k, ext = parts
        if k != key:
            if key is not None:
                yield key, files
            key, files = k, {}
        if with_data:
            fh = tar.extractfile(info)
            files[ext.lower()] = fh.read() if fh is not None else b""
        else:
            files[ext.lower()] = b""
    if key is not None:
        yield key, files


class WebDatasetSource(Source):
    """Samples of existing WebDataset tars, re-prepared by ingest."""

    format_name: ClassVar[str] = "webdataset"
    OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url.rstrip("/") or url, **options)
        self._fs, root = storage.get_fs(self.url)
        self._root = root.rstrip("/")

    def _tars(self) -> list[str]:
        """Full paths of the tars, sorted."""
        if "{" in self._root:
            from braceexpand import braceexpand

            return sorted(p for p in braceexpand(self._root) if self._fs.exists(p))
        if self._fs.isfile(self._root):
            return [self._root]
        if not self._fs.isdir(self._root):
            return []
        return sorted(p for p in self._fs.ls(self._root, detail=False)
                      if p.endswith(".tar") and not posixpath.basename(p).startswith("."))

    def validate(self) -> None:
        tars = self._tars()
        if not tars:
            raise SourceError(f"webdataset source {self.url!r}: no .tar shards found")
        for path in tars:
            try:
                with self._fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                    tar.next()
            except tarfile.TarError as exc:
                raise SourceError(f"webdataset source: {posixpath.basename(path)} is not a tar file ({exc})") from exc
        if next(self.list_refs(), None) is None:
            raise SourceError(f"webdataset source {self.url!r}: the shards hold no samples")

    def list_refs(self) -> Iterator[str]:
        for path in self._tars():
            name = posixpath.basename(path)
            with self._fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                for key, _ in _groups(tar, with_data=False):
                    yield f"{name}/{key}"

    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        paths = {posixpath.basename(p): p for p in self._tars()}
        i = 0
        while i < len(refs):
            name = refs[i].split("/", 1)[0]
            j = i
            while j < len(refs) and refs[j].split("/", 1)[0] == name:
                j += 1
            if name not in paths:
                for ref in refs[i:j]:
                    yield SourceItem(ref, error="missing_file")
            else:
                yield from self._load_tar(paths[name], refs[i:j])
            i = j

    def _load_tar(self, path: str, refs: Sequence[str]) -> Iterator[SourceItem]:
        """Stream the tar once; hold only samples that are needed and not yet due (none in order)."""
        keys = [r.split("/", 1)[1] if "/" in r else "" for r in refs]
        remaining = Counter(keys)
        held: dict[str, dict[str, bytes]] = {}
        pos = 0
        with self._fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for key, files in _groups(tar, with_data=True):
                if remaining.get(key, 0) > 0 and key not in held:
                    held[key] = files
                while pos < len(keys) and keys[pos] in held:
                    key_now = keys[pos]
                    yield self._item(refs[pos], held[key_now])
                    remaining[key_now] -= 1
                    if remaining[key_now] == 0:
                        del held[key_now]
                    pos += 1
                if pos == len(keys):
                    return
        for ref, key in zip(refs[pos:], keys[pos:]):
            yield self._item(ref, held[key]) if key in held else SourceItem(ref, error="missing_in_tar")

    @staticmethod
    def _item(ref: str, files: dict[str, bytes]) -> SourceItem:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if image_ext is None:
            return SourceItem(ref, error="missing_image")
        text, flags = clean_caption(files.get("txt"))
        meta: dict[str, Any] = {"original_ext": image_ext, **caption_meta(flags)}
        return SourceItem(ref, image=files[image_ext], caption=text, meta=meta)
