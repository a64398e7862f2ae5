"""Pick-a-Pic preference pairs (parquet, the public dataset's columns) -> the preferred image.

The public files (``yuvalkirstain/pickapic_v1`` / ``_v2``) hold one row per comparison:
``caption`` (the prompt), ``jpg_0``/``jpg_1`` (image bytes), ``label_0``/``label_1`` (1/0 for a
preference, 0.5/0.5 for a tie), ``has_label``, ``image_0_uid``/``image_1_uid``, ``best_image_uid``,
``are_different``, ``model_0``/``model_1``, ``ranking_id``, ``user_id``, ``created_at``, ... .

As in CnC (584K pairs -> 138K kept) we keep only the preferred image of a labelled, non-tied pair
and drop inappropriate content. The dataset carries no NSFW column, so, like the CnC reference
scripts, the filter works on the prompt: a row is ``nsfw_caption`` when a word of its caption is in
:data:`NSFW_PROMPT_WORDS` (lower-cased word match), and ``caption_too_short`` when the prompt has
fewer than ``min_caption_words`` (3, as in the reference) words. An image can win several
comparisons: it is kept once (later rows become ``duplicate_source_id``).

Source ids locate the row: ``<file>:<row>:<image uid>`` for a candidate and ``<file>:<row>`` for a
row the reader rejects. A row whose preferred image was already listed repeats the first row's id,
so the ingest plan counts it and rejects it as a duplicate. Listing reads only the small columns;
loading reads one row group at a time and only the row groups that hold the requested rows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.sources.base import Source, SourceError, SourceItem
from tasks.sources.captions import caption_meta, clean_caption

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "image_0_uid", "image_1_uid")
_VERDICT_COLUMNS = ["caption", "has_label", "label_0", "label_1", "image_0_uid", "image_1_uid"]
_META_COLUMNS = ("ranking_id", "model_0", "model_1")
FILE_REF = ":file"  # suffix of the one ref of a file that cannot be read as Pick-a-Pic rows
_LOAD_BATCH = 16  # rows decoded at a time (two images each): memory does not grow with row-group size
_READ_BUFFER = 1 << 20  # stream column pages through a buffer instead of reading whole column chunks
# errors of a corrupt file rather than of the storage under it (those stay errors: the shard is retried)
_TRANSIENT = (FileNotFoundError, PermissionError, ConnectionError, TimeoutError)

# Prompt words that mark a row as inappropriate: sexual content and nudity, terms that invite
# sexualised depictions of people, violence and gore, drugs. Same mechanism as the CnC reference
# (a word blocklist on the prompt; Pick-a-Pic has no NSFW label); extend with ``nsfw_words=``.
NSFW_PROMPT_WORDS = frozenset({
    # sexual content, nudity
    "nsfw", "nude", "nudes", "nudity", "naked", "naturist", "topless", "sex", "sexy", "sexual", "porn", "porno",
    "pornographic", "erotic", "erotica", "explicit", "xxx", "hentai", "lewd", "lingerie", "bdsm", "fetish",
    "kinky", "seductive", "seductress", "risqué", "risque", "cleavage", "breast", "breasts", "boob", "boobs",
    "nipple", "nipples", "genital", "genitals", "vagina", "penis", "erection", "testicle", "testicles", "ass",
    "butt", "dildo", "vibrator", "gloryhole", "fuck", "fucking", "fuuck", "fuucking", "milf", "waifu",
    "stripper", "prostitute", "escort", "spread", "spreaded", "spreading", "kiss", "giantess",
    # people terms the reference also drops (sexualised-depiction risk)
    "girl", "girls", "woman", "women", "female", "boy", "boys", "teen", "teens", "女",
    # violence, gore, self-harm
    "gore", "gory", "blood", "bloody", "violence", "killing", "murder", "rape", "abuse", "suicide", "death",
    "corpse",
    # drugs
    "drug", "drugs", "cocaine", "heroin", "meth", "marijuana", "weed", "lsd", "ecstasy", "acid",
})
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def caption_words(caption: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(caption)]


def is_nsfw_prompt(caption: str, words: frozenset[str] = NSFW_PROMPT_WORDS) -> bool:
    """True if the prompt contains a blocked word (or a blocked CJK character anywhere)."""
    tokens = set(caption_words(caption))
    if tokens & words:
        return True
    return any(len(w) == 1 and not w.isascii() and w in caption for w in words)


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a parquet file's columns are not Pick-a-Pic's (missing, or of the wrong type), or None."""
    names = set(schema.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        return f"lacks column(s) {', '.join(missing)}"
    kinds = {"caption": _is_text, "image_0_uid": _is_text, "image_1_uid": _is_text,
             "jpg_0": _is_bytes, "jpg_1": _is_bytes, "label_0": _is_number, "label_1": _is_number,
             "has_label": lambda t: pa.types.is_boolean(t) or pa.types.is_integer(t)}
    wrong = [f"{c} is {schema.field(c).type}" for c, ok in kinds.items() if not ok(schema.field(c).type)]
    return f"wrong column type(s): {', '.join(wrong)}" if wrong else None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


SELECTIONS = ("project", "official")
"""``project``: drop unlabelled and tied pairs, count caption words with a word regex.
``official``: the reference's ``data/parse_pickapic.py``: ``jpg_0`` if ``label_0 > label_1``, else
``jpg_1`` (ties and unlabelled pairs included), captions split on whitespace (``:`` removed)."""


def official_row_verdict(row: dict[str, Any], *, nsfw_filter: bool = True, min_caption_words: int = 3,
                         nsfw_words: frozenset[str] = NSFW_PROMPT_WORDS) -> tuple[int | None, str | None, str | None]:
    """:func:`row_verdict` as ``data/parse_pickapic.py`` selects: no label check, a tie (or any
    pair whose labels do not compare, e.g. unlabelled) keeps ``jpg_1``; a caption is too short
    below ``min_caption_words`` whitespace-separated words and blocked when one of those words,
    lower-cased, is in the word list (the reference's own list is not published)."""
    caption = str(row.get("caption") or "").replace(":", "")
    words = caption.lower().split()
    if nsfw_filter and any(w in nsfw_words for w in words):
        return None, None, "nsfw_caption"
    if len(caption.split()) < min_caption_words:
        return None, None, "caption_too_short"
    l0, l1 = row.get("label_0"), row.get("label_1")
    try:
        side = 0 if l0 > l1 else 1
    except TypeError:  # None: does not compare, the reference's else branch
        side = 1
    uid = row.get(f"image_{side}_uid")
    if not uid:
        return None, None, "missing_image_uid"
    return side, str(uid).replace(":", "_"), None


def row_verdict(row: dict[str, Any], *, nsfw_filter: bool = True, min_caption_words: int = 3,
                nsfw_words: frozenset[str] = NSFW_PROMPT_WORDS) -> tuple[int | None, str | None, str | None]:
    """(preferred side 0/1, its image uid, reject reason) for one row; side/uid None when rejected."""
    if not row.get("has_label"):
        return None, None, "unlabelled_pair"
    l0, l1 = row.get("label_0"), row.get("label_1")
    if l0 is None or l1 is None or l0 != l0 or l1 != l1:  # None or NaN
        return None, None, "unlabelled_pair"
    if l0 == l1:
        return None, None, "tied_pair"
    side = 0 if l0 > l1 else 1
    caption, _ = clean_caption(row.get("caption"))
    if caption is None or len(caption_words(caption)) < min_caption_words:
        if min_caption_words > 0:
            return None, None, "caption_too_short"
    if nsfw_filter and caption is not None and is_nsfw_prompt(caption, nsfw_words):
        return None, None, "nsfw_caption"
    uid = row.get(f"image_{side}_uid")
    if not uid:
        return None, None, "missing_image_uid"
    return side, str(uid).replace(":", "_"), None


def parse_ref(ref: str) -> tuple[str, int, str | None]:
    """``file:row[:uid]`` -> (file, row, uid or None); ``file:file`` (a whole unreadable file) -> (file, -1, None)."""
    if ref.endswith(FILE_REF):
        return ref[: -len(FILE_REF)], -1, None
    parts = ref.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2]
    file, row = ref.rsplit(":", 1)
    return file, int(row), None


class PickapicSource(Source):
    """The preferred image of each labelled, non-tied, appropriate Pick-a-Pic pair."""

    format_name: ClassVar[str] = "pickapic"
    OPTIONS: ClassVar[tuple[str, ...]] = ("nsfw_filter", "min_caption_words", "nsfw_words", "selection")

    def __init__(self, url: str, nsfw_filter: bool = True, min_caption_words: int = 3,
                 nsfw_words: Sequence[str] | None = None, selection: str = "project", **options: Any) -> None:
        if selection not in SELECTIONS:
            raise SourceError(f"pickapic selection must be one of {SELECTIONS}, got {selection!r}")
        extra = {"selection": selection} if selection != "project" else {}  # old manifests stay byte-identical
        super().__init__(url.rstrip("/") or url, nsfw_filter=nsfw_filter, min_caption_words=min_caption_words,
                         nsfw_words=list(nsfw_words) if nsfw_words else None, **extra, **options)
        self.selection = selection
        self._fs, root = storage.get_fs(self.url)
        self._root = root.rstrip("/")
        self.nsfw_filter = bool(nsfw_filter)
        self.min_caption_words = int(min_caption_words)
        self.nsfw_words = NSFW_PROMPT_WORDS | frozenset(w.lower() for w in (nsfw_words or ()))

    def _verdict(self, row: dict[str, Any]) -> tuple[int | None, str | None, str | None]:
        verdict = official_row_verdict if self.selection == "official" else row_verdict
        return verdict(row, nsfw_filter=self.nsfw_filter, min_caption_words=self.min_caption_words,
                           nsfw_words=self.nsfw_words)

    # ------------------------------------------------------------------------------- files
    def _files(self) -> list[str]:
        """Relative names of the parquet files ('' when the URL is one file), sorted."""
        if self._fs.isfile(self._root):
            return [""]
        prefix = self._root + "/"
        return sorted(p[len(prefix):] for p in self._fs.find(self._root)
                      if p.endswith(".parquet") and not any(s.startswith(".") for s in p[len(prefix):].split("/")))

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def _display(self, rel: str) -> str:
        return rel or self._root.rsplit("/", 1)[-1]

    @contextlib.contextmanager
    def _open(self, rel: str) -> Iterator[pq.ParquetFile]:
        with self._fs.open(self._path(rel), "rb") as fh:
            yield pq.ParquetFile(fh, buffer_size=_READ_BUFFER, pre_buffer=False)

    def _file_problem(self, rel: str) -> str | None:
        """Why file ``rel`` cannot be read as Pick-a-Pic rows (not parquet, wrong columns), or None."""
        try:
            with self._open(rel) as pf:
                return schema_problem(pf.schema_arrow)
        except _TRANSIENT:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            return f"not a parquet file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"

    def validate(self) -> None:
        if not self._fs.exists(self._root):
            raise SourceError(f"pickapic source {self.url!r} does not exist")
        files = self._files()
        if not files:
            raise SourceError(f"pickapic source {self.url!r} holds no .parquet files")
        problems = {rel: self._file_problem(rel) for rel in files}
        if all(problems.values()):  # one bad file among good ones is a reject; all bad is a wrong source
            rel, problem = next(iter(problems.items()))
            raise SourceError(f"pickapic source: {self._display(rel)} {problem}")
        if next(self.list_refs(), None) is None:
            raise SourceError(f"pickapic source {self.url!r} has no rows")

    # ----------------------------------------------------------------------------- listing
    def list_refs(self) -> Iterator[str]:
        """One ref per row; a file that is not Pick-a-Pic parquet, or that breaks off while being
        listed, adds one ``<file>:file`` ref (a ``corrupt_parquet`` / ``bad_parquet_schema`` reject)."""
        first_ref_of_uid: dict[str, str] = {}
        for rel in self._files():
            name = self._display(rel)
            if self._file_problem(rel) is not None:
                yield f"{name}{FILE_REF}"
                continue
            row = 0
            try:
                with self._open(rel) as pf:
                    for batch in pf.iter_batches(batch_size=8192, columns=_VERDICT_COLUMNS):
                        for r in batch.to_pylist():
                            _, uid, reason = self._verdict(r)
                            if reason is not None:
                                yield f"{name}:{row}"
                            else:
                                yield first_ref_of_uid.setdefault(uid, f"{name}:{row}:{uid}")
                            row += 1
            except _TRANSIENT:
                raise
            except (pa.ArrowException, OSError):
                yield f"{name}{FILE_REF}"  # the rows from ``row`` on cannot be listed

    # ----------------------------------------------------------------------------- loading
    def load(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        by_name = {self._display(rel): rel for rel in self._files()}
        i = 0
        while i < len(refs):
            name, _, _ = parse_ref(refs[i])
            j = i
            while j < len(refs) and parse_ref(refs[j])[0] == name:
                j += 1
            if name not in by_name:
                for ref in refs[i:j]:
                    yield SourceItem(ref, error="missing_file")
            else:
                yield from self._load_file(by_name[name], refs[i:j])
            i = j

    def _load_file(self, rel: str, refs: Sequence[str]) -> Iterator[SourceItem]:
        problem = self._file_problem(rel)
        if problem is not None:
            reason = "bad_parquet_schema" if problem.startswith(("lacks", "wrong")) else "corrupt_parquet"
            for ref in refs:
                yield SourceItem(ref, error=reason)
            return
        with self._open(rel) as pf:
            yield from self._load_rows(pf, refs)

    def _load_rows(self, pf: pq.ParquetFile, refs: Sequence[str]) -> Iterator[SourceItem]:
        """Rows streamed :data:`_LOAD_BATCH` at a time from only the row groups that hold them; a
        row group that fails to decode rejects its rows (``corrupt_parquet``), not the file."""
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        columns = [c for c in REQUIRED_COLUMNS if not c.startswith("jpg_")]
        columns += [c for c in _META_COLUMNS if c in pf.schema_arrow.names]
        wanted: dict[int, set[int]] = {}  # row group -> its rows that need an image (refs with a uid)
        for ref in refs:
            _, row, uid = parse_ref(ref)
            if uid is not None and 0 <= row < starts[-1]:
                g = next(i for i in range(len(starts) - 1) if starts[i] <= row < starts[i + 1])
                wanted.setdefault(g, set()).add(row - starts[g])
        group, batches, first, rows, broken = -1, iter(()), 0, [], None
        for ref in refs:
            _, row, uid = parse_ref(ref)
            if row == -1:
                yield SourceItem(ref, error="corrupt_parquet")  # listed as a file that broke off
                continue
            if not 0 <= row < starts[-1]:
                yield SourceItem(ref, error="missing_row")
                continue
            g = next(i for i in range(len(starts) - 1) if starts[i] <= row < starts[i + 1])
            local = row - starts[g]
            try:
                if g != group or local < first:  # refs come in row order: each row group is streamed once
                    group, first, rows, broken = g, 0, [], None
                    images = self._image_columns(pf, g, wanted.get(g, set()))
                    batches = pf.iter_batches(batch_size=_LOAD_BATCH, row_groups=[g], columns=columns + images)
                while broken is None and local >= first + len(rows):
                    first += len(rows)
                    rows = next(batches).to_pylist()
            except _TRANSIENT:
                raise
            except (pa.ArrowException, OSError, StopIteration) as exc:
                broken = f"corrupt_parquet: {type(exc).__name__}"
            if broken is not None:
                yield SourceItem(ref, error=broken)
                continue
            yield self._item(ref, rows[local - first], uid)

    def _image_columns(self, pf: pq.ParquetFile, group: int, rows: set[int]) -> list[str]:
        """The image columns (``jpg_0``/``jpg_1``) the preferred sides of ``rows`` of ``group`` need,
        found from the small verdict columns, so that a group of one-sided winners reads one image column."""
        sides: set[int] = set()
        pos = 0
        for batch in pf.iter_batches(batch_size=8192, row_groups=[group], columns=_VERDICT_COLUMNS):
            for r in batch.to_pylist():
                if pos in rows:
                    side, _, reason = self._verdict(r)
                    if reason is None:
                        sides.add(side)
                pos += 1
            if len(sides) == 2:
                break
        return [f"jpg_{side}" for side in sorted(sides)]

    def _item(self, ref: str, r: dict[str, Any], uid: str | None) -> SourceItem:
        side, got_uid, reason = self._verdict(r)
        if reason is not None:
            return SourceItem(ref, error=reason)
        if uid != got_uid:
            return SourceItem(ref, error="source_changed")
        data = r.get(f"jpg_{side}")
        if not data:
            return SourceItem(ref, error="missing_image_bytes")
        caption, flags = clean_caption(r.get("caption"))
        meta: dict[str, Any] = {"image_uid": got_uid, "preferred": side, **caption_meta(flags)}
        if r.get("ranking_id") is not None:
            meta["ranking_id"] = r["ranking_id"]
        if r.get(f"model_{side}") is not None:
            meta["model"] = r[f"model_{side}"]
        return SourceItem(ref, image=bytes(data), caption=caption, meta=meta)
