"""Caption text as sources hand it over: decoded, cleaned, and flagged when something was fixed.

Policy (the same for every source): UTF-8 (a BOM is dropped); bytes that are not UTF-8 are
decoded with replacement characters and flagged ``not_utf8`` rather than rejecting the image;
NUL and other control characters (except newline and tab) are removed (``control_chars``);
surrounding whitespace is stripped; an empty result means "no caption" (``empty``). Very long
captions are left to the ingest stage, which truncates them.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_caption(raw: bytes | str | None) -> tuple[str | None, list[str]]:
    """(caption or None, flags). ``None`` in means a missing caption (flag ``missing``)."""
    if raw is None:
        return None, ["missing"]
    flags: list[str] = []
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            flags.append("not_utf8")
    else:
        text = raw
    cleaned = _CONTROL.sub("", text)
    if cleaned != text:
        flags.append("control_chars")
    cleaned = cleaned.strip()
    if not cleaned:
        return None, flags + ["empty"]
    return cleaned, flags


def caption_meta(flags: list[str]) -> dict[str, list[str]]:
    """The ``meta`` entry recording caption flags (nothing when there are none)."""
    return {"caption_flags": flags} if flags else {}
