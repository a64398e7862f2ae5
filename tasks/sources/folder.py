"""A folder tree of images, each with an optional caption in a same-name ``.txt`` beside it.

Source ids are the image paths relative to the root (posix separators), listed sorted. Images are
recognised by extension (case-insensitive); hidden files and folders are skipped. Loading reads
a few files at a time with ``fs.cat_ranges`` (concurrent on object stores, bounded memory).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from tasks import storage
from tasks.sources.base import Source, SourceError, SourceItem
from tasks.sources.captions import caption_meta, clean_caption

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
_BATCH = 16


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class FolderSource(Source):
    """Images under a folder (recursively), captions from ``<stem>.txt``."""

    format_name: ClassVar[str] = "folder"
    OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url.rstrip("/") or url, **options)
        self._fs, self._root = storage.get_fs(self.url)
        self._root = self._root.rstrip("/")

    def validate(self) -> None:
        if not self._fs.exists(self._root):
            raise SourceError(f"folder source {self.url!r} does not exist")
        if not self._fs.isdir(self._root):
            raise SourceError(f"folder source {self.url!r} is not a folder")
        if next(self.list_refs(), None) is None:
            raise SourceError(f"folder source {self.url!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def list_refs(self) -> Iterator[str]:
        prefix = self._root + "/"
        rels = []
        for path in self._fs.find(self._root):
            rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if is_image_name(rel):
                rels.append(rel)
        yield from sorted(rels)

    def _path(self, ref: str) -> str:
        return f"{self._root}/{ref}"

    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        for start in range(0, len(refs), _BATCH):
            batch = list(refs[start:start + _BATCH])
            images = [self._path(r) for r in batch]
            captions = [posixpath.splitext(p)[0] + ".txt" for p in images]
            # cat_ranges takes paths literally (no glob expansion of "[1].jpg") and is concurrent
            # on async file systems such as s3
            got = self._fs.cat_ranges(images + captions, None, None, on_error="return")
            for i, ref in enumerate(batch):
                yield self._item(ref, got[i], got[len(batch) + i])

    @staticmethod
    def _item(ref: str, image: Any, caption: Any) -> SourceItem:
        if isinstance(image, FileNotFoundError) or image is None:
            return SourceItem(ref, error="missing_file")
        if isinstance(image, Exception):
            return SourceItem(ref, error=f"read_error: {type(image).__name__}")
        if isinstance(caption, Exception) or caption is None:
            caption = None
        text, flags = clean_caption(caption)
        return SourceItem(ref, image=image, caption=text, meta=caption_meta(flags))
