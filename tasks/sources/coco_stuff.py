"""COCO-Stuff: images, ``stuffthingmaps`` label maps and the COCO captions JSON.

Layout under the root URL (as the public downloads unpack)::

    images/<split>/<file_name>                 e.g. images/train2017/000000000009.jpg
    stuffthingmaps/<split>/<stem>.png          8-bit label map, pixel = COCO category id - 1, 255 unlabelled
    annotations/captions_<split>.json          COCO captions: {"images": [...], "annotations": [...]}

The label maps may also sit where the COCO-Stuff README unzips them, ``annotations/<split>/``
(``label_dir="annotations"``); by default ``stuffthingmaps/`` is used when it exists, else that.

Inputs are the entries of the captions JSON's ``images`` list, listed by image id; the source id is
``<split>/<file_name>``. An entry without an integer ``id`` and a string ``file_name`` is a
``bad_coco_entry`` reject, and a ``file_name`` that would leave ``images/<split>/`` (absolute,
``..``, backslash, NUL) an ``unsafe_file_name`` reject; both get the source id
``<split>#images[<position in the list>]`` and are listed after the others. An id listed twice
yields its ref twice, so the ingest plan turns the second into a ``duplicate_source_id`` reject. The caption is one of the image's captions (ordered by
annotation id) picked by a seeded hash of the image id: random-looking, yet the same on every run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from tasks import storage
from tasks.sources.base import Source, SourceError, SourceItem, read_failure
from tasks.sources.captions import caption_meta, clean_caption

_BATCH = 16
_CACHE: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def pick_caption_index(image_id: int, n: int, seed: int = 0) -> int:
    """Deterministic 'random' choice of one of ``n`` captions for ``image_id``."""
    digest = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_safe_file_name(name: str) -> bool:
    """True if ``name`` stays inside the split folder: relative, normalised, no ``..``, no NUL or backslash."""
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\x00" not in name
            and posixpath.normpath(name) == name and ".." not in name.split("/"))


def entry_problem(img: Any) -> str | None:
    """The reject reason of one ``images`` entry of the captions JSON, or None if it is usable."""
    if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
        return "bad_coco_entry"
    return None if is_safe_file_name(img["file_name"]) else "unsafe_file_name"


class CocoStuffSource(Source):
    """COCO-Stuff images with a caption and the label map the things mask is derived from."""

    format_name: ClassVar[str] = "coco-stuff"
    OPTIONS: ClassVar[tuple[str, ...]] = ("split", "caption_seed", "label_dir")

    def __init__(self, url: str, split: str | None = None, caption_seed: int = 0, label_dir: str | None = None,
                 **options: Any) -> None:
        super().__init__(url.rstrip("/") or url, split=split, caption_seed=caption_seed, label_dir=label_dir,
                         **options)
        self._label_dir = label_dir
        self._fs, root = storage.get_fs(self.url)
        self._root = root.rstrip("/")
        self._split = split
        self.caption_seed = int(caption_seed)

    # -------------------------------------------------------------------------------- layout
    @property
    def split(self) -> str:
        if self._split is None:
            self._split = self._detect_split()
        return self._split

    def _detect_split(self) -> str:
        ann = f"{self._root}/annotations"
        names = []
        if self._fs.isdir(ann):
            names = sorted(posixpath.basename(p) for p in self._fs.ls(ann, detail=False))
        splits = [n[len("captions_"):-len(".json")] for n in names if n.startswith("captions_") and n.endswith(".json")]
        if len(splits) != 1:
            found = ", ".join(splits) or "none"
            raise SourceError(f"coco-stuff source {self.url!r}: pass split= "
                              f"(annotations/captions_<split>.json found: {found})")
        return splits[0]

    @property
    def label_dir(self) -> str:
        """Folder (under the root) holding ``<split>/<stem>.png`` label maps."""
        if self._label_dir is None:
            default = f"{self._root}/stuffthingmaps/{self.split}"
            readme = f"{self._root}/annotations/{self.split}"
            use_readme = not self._fs.isdir(default) and self._fs.isdir(readme)
            self._label_dir = "annotations" if use_readme else "stuffthingmaps"
        return self._label_dir

    def _captions_path(self) -> str:
        return f"{self._root}/annotations/captions_{self.split}.json"

    def validate(self) -> None:
        if not self._fs.isdir(self._root):
            raise SourceError(f"coco-stuff source {self.url!r} does not exist")
        split = self.split
        for sub in (f"images/{split}", f"{self.label_dir}/{split}"):
            if not self._fs.isdir(f"{self._root}/{sub}"):
                raise SourceError(f"coco-stuff source {self.url!r} has no {sub}/ folder")
        if not self._fs.exists(self._captions_path()):
            raise SourceError(f"coco-stuff source {self.url!r} has no annotations/captions_{split}.json")
        if not self._index()["order"]:
            raise SourceError(f"coco-stuff source {self.url!r}: captions_{split}.json lists no images")

    # -------------------------------------------------------------------------------- index
    def _index(self) -> dict[str, Any]:
        """Parsed captions JSON, cached per process (workers handle many shards of one source)."""
        path = self._captions_path()
        info = self._fs.info(path)
        stamp = ":".join(str(info.get(k, "")) for k in ("size", "mtime", "LastModified", "ETag", "created"))
        key = (self._fs.unstrip_protocol(path), stamp)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
        try:
            doc = json.loads(self._fs.cat_file(path))
            images = doc["images"]
            annotations = doc.get("annotations", [])
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"coco-stuff source {self.url!r}: captions JSON is not in the COCO captions schema "
                              f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise SourceError(f"coco-stuff source {self.url!r}: captions JSON 'images'/'annotations' are not lists")
        captions: dict[int, list[tuple[int, str]]] = {}
        for ann in annotations:
            if isinstance(ann, dict) and _is_id(ann.get("image_id")):
                ann_id = ann.get("id", 0)
                captions.setdefault(ann["image_id"], []).append((ann_id if _is_id(ann_id) else 0, ann.get("caption")))
        by_file: dict[str, int] = {}
        order: list[tuple[int, str]] = []
        bad: dict[str, str] = {}
        for i, img in enumerate(images):
            reason = entry_problem(img)
            if reason is not None:
                bad[f"{self.split}#images[{i}]"] = reason
                continue
            by_file.setdefault(img["file_name"], img["id"])
            order.append((img["id"], img["file_name"]))
        order.sort()
        index = {"order": order, "by_file": by_file, "bad": bad,
                 "captions": {k: [c for _, c in sorted(v, key=lambda t: t[0])] for k, v in captions.items()}}
        with _CACHE_LOCK:
            _CACHE[key] = index
            while len(_CACHE) > 2:
                _CACHE.popitem(last=False)
        return index

    # ------------------------------------------------------------------------------ reading
    def list_refs(self) -> Iterator[str]:
        index = self._index()
        for _, file_name in index["order"]:
            yield f"{self.split}/{file_name}"
        yield from index["bad"]  # entries that name no readable file, in JSON order, as rejects

    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        index = self._index()
        for start in range(0, len(refs), _BATCH):
            batch = list(refs[start:start + _BATCH])
            names = [r.split("/", 1)[1] if r.startswith(f"{self.split}/") else None for r in batch]
            readable = [i for i, n in enumerate(names) if n is not None and is_safe_file_name(n)]
            image_paths = [f"{self._root}/images/{self.split}/{names[i]}" for i in readable]
            label_root = f"{self._root}/{self.label_dir}/{self.split}"
            label_paths = [f"{label_root}/{posixpath.splitext(names[i])[0]}.png" for i in readable]
            got = self._fs.cat_ranges(image_paths + label_paths, None, None, on_error="return") if readable else []
            slot = {i: k for k, i in enumerate(readable)}
            for i, (ref, name) in enumerate(zip(batch, names)):
                if i not in slot:
                    yield SourceItem(ref, error=index["bad"].get(ref, "unsafe_file_name"))
                    continue
                k = slot[i]
                yield self._item(ref, name, got[k], got[len(readable) + k], index)

    def _item(self, ref: str, name: str, image: Any, label: Any, index: dict[str, Any]) -> SourceItem:
        image_id = index["by_file"].get(name)
        if image_id is None:
            return SourceItem(ref, error="not_in_captions_json")
        if image is None or isinstance(image, FileNotFoundError):
            return SourceItem(ref, error="missing_image")
        if isinstance(image, Exception):
            return read_failure(ref, image, f"read_error: {type(image).__name__}")
        if label is None or isinstance(label, FileNotFoundError):
            return SourceItem(ref, error="missing_label_map")
        if isinstance(label, Exception):
            return read_failure(ref, label, f"read_error: {type(label).__name__}")
        meta: dict[str, Any] = {"coco_image_id": image_id, "split": self.split}
        options = index["captions"].get(image_id, [])
        raw = None
        if options:
            choice = pick_caption_index(image_id, len(options), self.caption_seed)
            meta["caption_index"] = choice
            raw = options[choice] if isinstance(options[choice], (str, bytes)) else None
        text, flags = clean_caption(raw)
        meta.update(caption_meta(flags))
        return SourceItem(ref, image=image, caption=text, label_map=label, meta=meta)
