"""The contract every source reader follows.

A source is listed cheaply into *refs* (strings, no bytes) in a deterministic order, and a
list of refs is loaded back into exactly one :class:`SourceItem` each, in the same order.
That one-to-one rule is what lets the ingest stage account for every input: each ref ends as
a sample or as a reject with a reason, never as nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


class SourceError(ValueError):
    """The source as a whole is unusable (missing, empty, wrong layout). One-line message."""


@dataclass
class SourceItem:
    """One input as read from its source, before any decoding.

    ``error`` set means the reader itself rejects the item (missing file, tied Pick-a-Pic pair,
    NSFW flag, null bytes...): it becomes a reject record with that reason; with
    ``meta["retryable"]`` true it is a reject that ``--extend``/``--resume`` try again (its cause
    may pass), and ``meta["detail"]`` says more.
    """

    source_id: str
    image: bytes | None = None
    caption: str | None = None
    label_map: bytes | None = None  # COCO-Stuff stuffthingmaps PNG, cropped like the image
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def read_failure(ref: str, exc: BaseException, reason: str) -> SourceItem:
    """A per-file read error as this item's reject, with the exception as its detail. A
    transient error (network, throttling, a 5xx) is raised instead: it fails the shard, which
    the runner retries, rather than becoming a permanent reject that re-runs would skip."""
    from tasks.shard_job import describe, is_transient

    if is_transient(exc):
        raise exc
    return SourceItem(ref, error=reason, meta={"detail": describe(exc)})


class Source(ABC):
    """A reader for one source format, addressed by an fsspec URL."""

    format_name: ClassVar[str]

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options

    @abstractmethod
    def validate(self) -> None:
        """Raise :class:`SourceError` with a one-line reason if the source cannot be read."""

    @abstractmethod
    def list_refs(self) -> Iterator[str]:
        """Yield one ref per input item, deterministically ordered. Refs are the source ids."""

    @abstractmethod
    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """Yield exactly one item per ref, in order, streaming (bounded memory)."""

    def list_entries(self) -> Iterator[tuple[str, Any]]:
        """(ref, location) in listing order: what the listing learnt about where an item's bytes
        are (JSON-able, or None), for :meth:`load_located`. The default knows nothing."""
        for ref in self.list_refs():
            yield ref, None

    def load_located(self, refs: Sequence[str], where: Sequence[Any]) -> Iterator[SourceItem]:
        """:meth:`load` given the listing's locations of ``refs`` (a reader that can seek reads
        only what it needs). Locations are hints: the items are the same as :meth:`load`'s."""
        return self.load(refs)

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this source."""
        return {"format": self.format_name, "url": self.url, "options": self.options}
