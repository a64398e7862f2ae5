"""Existing WebDataset shards: plain ``.tar`` files of ``<key>.<ext>`` members.

The URL is a folder of ``.tar`` (or ``.tar.gz``/``.tgz``) files, one such file, or a brace
pattern (``shards/data-{000..009}.tar``). Members are grouped into samples the WebDataset way: the key is
the member path up to the first dot of its file name, and consecutive members with the same key
form one sample. The image is the first member with an image extension (in
:data:`IMAGE_EXTENSIONS` order), the caption the ``txt`` member.

Source ids are ``<tar name>/<key>``, in tar order. A key that occurs again later in the same tar
is listed again, and the ingest plan rejects it as ``duplicate_source_id``. Listing reads only the
tar headers (it seeks past the data) and records where each sample's bytes lie in an uncompressed
tar (:meth:`WebDatasetSource.list_entries`); loading with those locations reads only the byte
ranges of the samples asked for (contiguous samples in one ranged read of at most 64 MiB), so a
tar cut into many shards is not re-streamed from its start for each. Without locations (a
compressed tar, a sample the listing already rejects) or when the bytes at a location are not the
sample listed (the tar changed since), loading streams the tar front to back.

Members are never extracted to disk and only regular files are read. A sample with a symlink,
hardlink, device or FIFO member is ``non_regular_member: <kind>``, one whose member name has
``..`` or a leading ``/`` is ``unsafe_member_name``, one with a member above ``max_member_bytes``
(64 MiB) is ``member_too_large`` (its data is skipped, never held), one of more than 64 members
``too_many_members``; a tar cut short mid-member makes the samples from there ``truncated_tar``.
Memory stays bounded in the number of members (headers already passed are dropped).
"""

from __future__ import annotations

import gzip
import io
import logging
import posixpath
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from tasks import storage
from tasks.sources.base import Source, SourceError, SourceItem
from tasks.sources.captions import caption_meta, clean_caption

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_MEMBER_BYTES = 64 << 20  # as the folder source's per-file cap
MAX_SAMPLE_MEMBERS = 64  # files of one sample (jpg, txt, json, ...): more is not a sample
MAX_RANGE_BYTES = 64 << 20  # one ranged read of contiguous located samples
_BLOCK = tarfile.BLOCKSIZE
_CUT_SHORT = (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile)  # a truncated or corrupt tar / gzip stream
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.(.*)$")


def split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: ``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``); None if no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def is_safe_member_name(name: str) -> bool:
    """Relative, no ``..`` part: a name that could not escape a folder it were extracted to."""
    return not name.startswith("/") and ".." not in name.split("/") and "\x00" not in name


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device"
    return "fifo" if info.isfifo() else "special"


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's members, forgetting each header once passed (TarFile keeps every header it has
    read: O(members) memory in a tar of millions otherwise)."""
    while True:
        info = tar.next()
        if info is None:
            return
        tar.members.clear()
        yield info


def _groups(tar: tarfile.TarFile, with_data: bool, max_member_bytes: int = MAX_MEMBER_BYTES
            ) -> Iterator[tuple[str, dict[str, bytes], str | None, tuple[int, int]]]:
    """(key, {ext: bytes}, reject reason or None, (start, end)) for each run of consecutive members
    sharing a key; (start, end) is where the run's headers and data lie in the uncompressed tar.

    Nothing is extracted to disk. A sample with a member that is not a regular file (symlink,
    hardlink, device, FIFO), has a name with ``..`` or a leading ``/``, exceeds ``max_member_bytes``
    or makes the sample exceed :data:`MAX_SAMPLE_MEMBERS` members keeps its key but gets a reject
    reason, and no data of it is read; data cut short by a truncated tar is ``truncated_tar``."""
    key, files, problem, span = None, {}, None, (0, 0)
    members = _members(tar)
    while True:
        try:
            info = next(members, None)
        except _CUT_SHORT:  # the data of the pending sample's member ends before the tar does
            if key is not None:
                yield key, {}, "truncated_tar", span
            return
        if info is None:
            break
        if info.isdir():
            continue
        parts = split_member(info.name)
        if parts is None or posixpath.basename(parts[0]).startswith("."):
            continue
        k, ext = parts
        end = info.offset_data + (-(-info.size // _BLOCK) * _BLOCK if info.isreg() else 0)
        if k != key:
            if key is not None:
                yield key, files, problem, span
            key, files, problem, span = k, {}, None, (info.offset, end)
        else:
            span = (span[0], end)
        if problem is not None:
            continue
        if not is_safe_member_name(info.name):
            problem = "unsafe_member_name"
        elif not info.isfile():
            problem = f"non_regular_member: {_kind(info)}"
        elif info.size > max_member_bytes:
            problem = "member_too_large"
        elif len(files) >= MAX_SAMPLE_MEMBERS:
            problem = "too_many_members"
        if problem is not None:
            files = {}
            continue
        if with_data:
            try:
                fh = tar.extractfile(info)
                files[ext.lower()] = fh.read() if fh is not None else b""
            except _CUT_SHORT:
                yield key, {}, "truncated_tar", span
                return
        else:
            files[ext.lower()] = b""
    if key is not None:
        yield key, files, problem, span


def _valid_span(where: Any, max_member_bytes: int) -> bool:
    """A location as the listing writes it: two block-aligned offsets, a sample's worth of bytes."""
    if not (isinstance(where, (list, tuple)) and len(where) == 2 and all(type(v) is int for v in where)):
        return False
    start, end = where
    limit = MAX_SAMPLE_MEMBERS * (max_member_bytes + 4 * _BLOCK)
    return 0 <= start < end and start % _BLOCK == 0 and end % _BLOCK == 0 and end - start <= limit


def is_tar_name(path: str) -> bool:
    return path.endswith(TAR_SUFFIXES)


class WebDatasetSource(Source):
    """Samples of existing WebDataset tars, re-prepared by ingest."""

    format_name: ClassVar[str] = "webdataset"
    OPTIONS: ClassVar[tuple[str, ...]] = ("max_member_bytes",)

    def __init__(self, url: str, max_member_bytes: int = MAX_MEMBER_BYTES, **options: Any) -> None:
        super().__init__(url.rstrip("/") or url, **options)
        if max_member_bytes != MAX_MEMBER_BYTES:
            self.options["max_member_bytes"] = int(max_member_bytes)
        self.max_member_bytes = int(max_member_bytes)
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
                      if is_tar_name(p) and not posixpath.basename(p).startswith("."))

    def validate(self) -> None:
        tars = self._tars()
        if not tars:
            raise SourceError(f"webdataset source {self.url!r}: no .tar shards found")
        for path in tars:
            try:
                with self._fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
                    tar.next()
            except tarfile.TarError as exc:
                raise SourceError(f"webdataset source: {posixpath.basename(path)} is not a tar file ({exc})") from exc
        if next(self.list_refs(), None) is None:
            raise SourceError(f"webdataset source {self.url!r}: the shards hold no samples")

    def list_refs(self) -> Iterator[str]:
        for ref, _ in self.list_entries():
            yield ref

    def list_entries(self) -> Iterator[tuple[str, list[int] | None]]:
        """(ref, [start, end] of the sample's bytes in its tar): a location for every sample of an
        uncompressed tar that the listing does not already reject, else None."""
        for path in self._tars():
            name = posixpath.basename(path)
            with self._fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
                seekable = tar.fileobj is fh  # compressed tars are read through a decompressor
                for key, _, problem, span in _groups(tar, with_data=False, max_member_bytes=self.max_member_bytes):
                    yield f"{name}/{key}", list(span) if seekable and problem is None else None

    def load_located(self, refs: Sequence[str], where: Sequence[Any]) -> Iterator[SourceItem]:
        """:meth:`load`, reading only the located byte ranges of the samples asked for; a run of
        refs of one tar with any location missing is streamed."""
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
            elif all(_valid_span(w, self.max_member_bytes) for w in where[i:j]):
                yield from self._load_ranges(paths[name], refs[i:j], [tuple(w) for w in where[i:j]])
            else:
                yield from self._load_tar(paths[name], refs[i:j])
            i = j

    def _load_ranges(self, path: str, refs: Sequence[str], spans: Sequence[tuple[int, int]]) -> Iterator[SourceItem]:
        """Contiguous spans are read together; a span whose bytes are not the listed sample sends
        the rest to the streaming reader."""
        pos = 0
        while pos < len(refs):
            end = pos + 1
            while (end < len(refs) and spans[end][0] == spans[end - 1][1]
                   and spans[end][1] - spans[pos][0] <= MAX_RANGE_BYTES):
                end += 1
            start, stop = spans[pos][0], spans[end - 1][1]
            data = self._fs.cat_file(path, start=start, end=stop)
            got = []
            if len(data) == stop - start:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                    got = list(_groups(tar, with_data=True, max_member_bytes=self.max_member_bytes))
            keys = [r.split("/", 1)[1] if "/" in r else "" for r in refs[pos:end]]
            if [g[0] for g in got] != keys or any(g[2] is not None for g in got):
                log.warning("%s changed since it was listed: reading it front to back", path)
                yield from self._load_tar(path, refs[pos:])
                return
            for ref, (_, files, _, _) in zip(refs[pos:end], got):
                yield self._item(ref, files)
            pos = end

    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        return self.load_located(refs, [None] * len(refs))

    def _load_tar(self, path: str, refs: Sequence[str]) -> Iterator[SourceItem]:
        """Stream the tar once; hold only samples that are needed and not yet due (none in order)."""
        keys = [r.split("/", 1)[1] if "/" in r else "" for r in refs]
        remaining = Counter(keys)
        held: dict[str, tuple[dict[str, bytes], str | None]] = {}
        pos, truncated = 0, False
        with self._fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for key, files, problem, _ in _groups(tar, with_data=True, max_member_bytes=self.max_member_bytes):
                truncated = problem == "truncated_tar"
                if remaining.get(key, 0) > 0 and key not in held:
                    held[key] = (files, problem)
                while pos < len(keys) and keys[pos] in held:
                    key_now = keys[pos]
                    yield self._item(refs[pos], *held[key_now])
                    remaining[key_now] -= 1
                    if remaining[key_now] == 0:
                        del held[key_now]
                    pos += 1
                if pos == len(keys):
                    return
        for ref, key in zip(refs[pos:], keys[pos:]):
            if key in held:
                yield self._item(ref, *held[key])
            else:
                yield SourceItem(ref, error="truncated_tar" if truncated else "missing_in_tar")

    @staticmethod
    def _item(ref: str, files: dict[str, bytes], problem: str | None = None) -> SourceItem:
        if problem is not None:
            return SourceItem(ref, error=problem)
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if image_ext is None:
            return SourceItem(ref, error="missing_image")
        text, flags = clean_caption(files.get("txt"))
        meta: dict[str, Any] = {"original_ext": image_ext, **caption_meta(flags)}
        return SourceItem(ref, image=files[image_ext], caption=text, meta=meta)
