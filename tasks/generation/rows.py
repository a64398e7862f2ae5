"""Generation job rows: parse and check one row of a job table; a bad row becomes a reject reason.

A row names its own seed, so its image never depends on which batch or worker it landed in.
Rows that share :func:`settings_key` can go through the UNet together.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

CONDITION_FIELDS = ("fg_depth", "bg_depth", "fg_exemplar", "bg_exemplar", "mask")
"""Condition files: URLs (or paths relative to the job's condition root)."""
MAX_PROMPT_CHARS = 2000
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class RowError(ValueError):
    """A row that cannot be generated; ``reason`` is a short snake_case code for the rejects table."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class GenerationRow:
    """One image to make. Defaults are the paper's sampler (DDIM 50 steps, CFG 7)."""

    id: str
    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.0
    lambda_fg: float = 1.0
    lambda_bg: float = 1.0
    height: int | None = None
    width: int | None = None
    fg_depth: str | None = None
    bg_depth: str | None = None
    fg_exemplar: str | None = None
    bg_exemplar: str | None = None
    mask: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as stored beside its image (``json`` member of the sample)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def conditions(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in CONDITION_FIELDS if getattr(self, name)}


FIELDS = tuple(f.name for f in fields(GenerationRow))


def parse_row(raw: Mapping[str, Any], *, max_steps: int = 1000, max_side: int = 2048) -> GenerationRow:
    """A checked :class:`GenerationRow`; :class:`RowError` naming the first problem otherwise.
    Empty values (None, "") of optional fields count as absent, as parquet and JSONL write them."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise RowError("unknown_field", f"unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    values = {k: v for k, v in raw.items() if v is not None and v != ""}
    for name in ("id", "prompt", "seed"):
        if name not in values:
            raise RowError("missing_field", f"{name!r} is required")
    row_id = str(values["id"])
    if not _ID.match(row_id):
        raise RowError("bad_id", f"id {row_id!r} must be 1-128 letters, digits, '_' or '-'")
    for name in ("prompt", "negative_prompt"):
        if name in values and (not isinstance(values[name], str) or len(values[name]) > MAX_PROMPT_CHARS):
            raise RowError("bad_prompt", f"{name} must be text of at most {MAX_PROMPT_CHARS} characters")
    out: dict[str, Any] = {"id": row_id, "prompt": values["prompt"]}
    for name, kind, low, high in (("seed", int, 0, 2**63 - 1), ("steps", int, 1, max_steps),
                                  ("height", int, 8, max_side), ("width", int, 8, max_side),
                                  ("guidance_scale", float, 0.0, 100.0), ("lambda_fg", float, 0.0, 100.0),
                                  ("lambda_bg", float, 0.0, 100.0)):
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise RowError("bad_value", f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        value = kind(value)
        if not low <= value <= high or value != value:
            raise RowError("bad_value", f"{name}={value} outside [{low}, {high}]")
        if name in ("height", "width") and value % 8:
            raise RowError("bad_value", f"{name}={value} is not a multiple of 8")
        out[name] = value
    if "negative_prompt" in values:
        out["negative_prompt"] = values["negative_prompt"]
    for name in CONDITION_FIELDS:
        if name in values:
            if not isinstance(values[name], str):
                raise RowError("bad_value", f"{name} must be a URL or a relative path")
            out[name] = values[name]
    if "mask" in out and "fg_exemplar" not in out and "bg_exemplar" not in out:
        raise RowError("bad_value", "mask only applies to exemplars: give fg_exemplar and/or bg_exemplar")
    return GenerationRow(**out)


def settings_key(row: GenerationRow) -> tuple:
    """Rows with equal keys share one UNet batch: same sampler, size, weights and condition kinds."""
    return (row.steps, row.guidance_scale, row.lambda_fg, row.lambda_bg, row.height, row.width,
            tuple(name for name in CONDITION_FIELDS if getattr(row, name)))
