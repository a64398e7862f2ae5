"""A folder tree of images, each with an optional caption in a same-name ``.txt`` beside it.

Source ids are the image paths relative to the root (posix separators), listed sorted. Images are
recognised by extension (case-insensitive); hidden files and folders are skipped. Loading reads
a few files at a time with ``fs.cat_ranges`` (concurrent on object stores, bounded memory).

Hostile trees: on local disks only regular files whose real path is under the root are read
(a symlink out of the root is ``outside_source_root``, a FIFO, device or socket is
``not_a_regular_file``; symlinked folders are not descended), and no read follows a symlink or
blocks. Every read is capped: an image above ``max_file_bytes`` is ``file_too_large``, a caption
above ``max_caption_bytes`` ``caption_file_too_large``; a caption that cannot be read safely rejects its
image with the caption reason (``caption_...``) rather than silently dropping the caption.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from tasks import storage
from tasks.sources.base import Source, SourceError, SourceItem, read_failure
from tasks.sources.captions import caption_meta, clean_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
MAX_FILE_BYTES = 64 << 20  # a 100 MP PNG of a photo is ~30-60 MB; anything larger is not a photo
MAX_CAPTION_BYTES = 1 << 20  # ingest keeps 4096 characters; a bigger file is not a caption
_BATCH = 16


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class Refused(Exception):
    """A file the source will not read, with the reject reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_capped_local(path: str, root_real: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file whose real path is under ``root_real`` and
    that holds at most ``max_bytes``; :class:`Refused` with the reason otherwise. Never blocks
    (FIFOs) and never reads more than ``max_bytes + 1`` bytes (``/dev/zero``, growing files)."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, root_real]) != root_real:
        raise Refused("outside_source_root")
    # O_NOFOLLOW: the resolved path must not have become a link since; O_NONBLOCK: a FIFO never blocks open
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("outside_source_root") from exc
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not_a_regular_file")
        if st.st_size > max_bytes:
            raise Refused("file_too_large")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused("file_too_large")
    return data


class FolderSource(Source):
    """Images under a folder (recursively), captions from ``<stem>.txt``."""

    format_name: ClassVar[str] = "folder"
    OPTIONS: ClassVar[tuple[str, ...]] = ("max_file_bytes", "max_caption_bytes")

    def __init__(self, url: str, max_file_bytes: int = MAX_FILE_BYTES, max_caption_bytes: int = MAX_CAPTION_BYTES,
                 **options: Any) -> None:
        super().__init__(url.rstrip("/") or url, **options)
        if max_file_bytes != MAX_FILE_BYTES:
            self.options["max_file_bytes"] = int(max_file_bytes)
        if max_caption_bytes != MAX_CAPTION_BYTES:
            self.options["max_caption_bytes"] = int(max_caption_bytes)
        self.max_file_bytes = int(max_file_bytes)
        self.max_caption_bytes = int(max_caption_bytes)
        if self.max_file_bytes < 1 or self.max_caption_bytes < 1:
            raise SourceError("folder source: max_file_bytes and max_caption_bytes must be positive")
        self._fs, self._root = storage.get_fs(self.url)
        self._root = self._root.rstrip("/") or "/"
        self._local = storage.protocol_of(self._fs) in ("file", "local")

    def validate(self) -> None:
        if not self._fs.exists(self._root):
            raise SourceError(f"folder source {self.url!r} does not exist")
        if not self._fs.isdir(self._root):
            raise SourceError(f"folder source {self.url!r} is not a folder")
        if next(self.list_refs(), None) is None:
            raise SourceError(f"folder source {self.url!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def _walk(self) -> Iterator[str]:
        """Relative paths of the files under the root (local: symlinked folders not descended)."""
        if self._local:
            for folder, dirs, names in os.walk(self._root, followlinks=False):
                rel_folder = os.path.relpath(folder, self._root)
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in names:
                    yield name if rel_folder == "." else posixpath.join(rel_folder.replace(os.sep, "/"), name)
            return
        prefix = self._root + "/"
        for path in self._fs.find(self._root):
            yield path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)

    def list_refs(self) -> Iterator[str]:
        rels = [rel for rel in self._walk()
                if is_image_name(rel) and not any(part.startswith(".") for part in rel.split("/"))]
        yield from sorted(rels)

    def _path(self, ref: str) -> str:
        return f"{self._root}/{ref}"

    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        for start in range(0, len(refs), _BATCH):
            batch = list(refs[start:start + _BATCH])
            images = [self._path(r) for r in batch]
            captions = [posixpath.splitext(p)[0] + ".txt" for p in images]
            if self._local:
                got = [self._read_local(p, self.max_file_bytes) for p in images]
                got += [self._read_local(p, self.max_caption_bytes) for p in captions]
            else:
                # cat_ranges takes paths literally (no glob expansion of "[1].jpg"), is concurrent on
                # async file systems such as s3, and reads at most the cap + 1 bytes of each file
                paths = images + captions
                caps = [self.max_file_bytes] * len(images) + [self.max_caption_bytes] * len(captions)
                got = self._fs.cat_ranges(paths, [0] * len(caps), [c + 1 for c in caps], on_error="return")
                got = [self._unranged(p, g, cap) if _range_refused(g) else _over_cap(g, cap)
                       for p, g, cap in zip(paths, got, caps)]
            for i, ref in enumerate(batch):
                yield self._item(ref, got[i], got[len(batch) + i])

    def _unranged(self, path: str, error: Exception, max_bytes: int) -> Any:
        """A ranged read refused (S3 answers 416 for any range of an empty object): size first, then whole."""
        try:
            size = self._fs.size(path)
            if size is not None and size > max_bytes:
                return Refused("file_too_large")
            return b"" if size == 0 else _over_cap(self._fs.cat_file(path), max_bytes)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            return error

    def _read_local(self, path: str, max_bytes: int) -> bytes | Exception:
        try:
            return read_capped_local(path, self._root_real, max_bytes)
        except Exception as exc:  # noqa: BLE001 - becomes this item's reject reason
            return exc

    @property
    def _root_real(self) -> str:
        return os.path.realpath(self._root)

    @staticmethod
    def _item(ref: str, image: Any, caption: Any) -> SourceItem:
        if isinstance(image, FileNotFoundError) or image is None:
            return SourceItem(ref, error="missing_file")
        if isinstance(image, Refused):
            return SourceItem(ref, error=image.reason)
        if isinstance(image, Exception):
            return read_failure(ref, image, f"read_error: {type(image).__name__}")
        if isinstance(caption, FileNotFoundError) or caption is None:
            caption = None
        elif isinstance(caption, Refused):
            return SourceItem(ref, error=f"caption_{caption.reason}")
        elif isinstance(caption, Exception):
            return read_failure(ref, caption, f"caption_read_error: {type(caption).__name__}")
        text, flags = clean_caption(caption)
        return SourceItem(ref, image=image, caption=text, meta=caption_meta(flags))


def _range_refused(got: Any) -> bool:
    return isinstance(got, OSError) and not isinstance(got, (FileNotFoundError, PermissionError))


def _over_cap(got: Any, max_bytes: int) -> Any:
    """A ranged read's result, or :class:`Refused` when it returned more than ``max_bytes``."""
    if isinstance(got, (bytes, bytearray)) and len(got) > max_bytes:
        return Refused("file_too_large")
    return got
