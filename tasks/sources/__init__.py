"""Source readers by format name: ``get_source("folder", url, **options)``."""

from __future__ import annotations

from typing import Any

from tasks.sources.base import Source, SourceError, SourceItem

SOURCE_FORMATS = ("folder", "coco-stuff", "pickapic", "webdataset")

__all__ = ["SOURCE_FORMATS", "Source", "SourceError", "SourceItem", "get_source"]


def get_source(format_name: str, url: str, **options: Any) -> Source:
    """The reader for ``format_name`` at ``url``. Unknown formats or options raise :class:`SourceError`."""
    if format_name == "folder":
        from tasks.sources.folder import FolderSource as cls
    elif format_name == "coco-stuff":
        from tasks.sources.coco_stuff import CocoStuffSource as cls
    elif format_name == "pickapic":
        from tasks.sources.pickapic import PickapicSource as cls
    elif format_name == "webdataset":
        from tasks.sources.webdataset_source import WebDatasetSource as cls
    else:
        raise SourceError(f"unknown source format {format_name!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        raise SourceError(f"{format_name} source: unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(cls.OPTIONS) or 'none'}")
    return cls(url, **options)
