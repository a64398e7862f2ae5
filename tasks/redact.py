"""Redaction of URLs before they are persisted or logged.

A URL can carry secrets in its user-info (``s3://KEY:SECRET@bucket/x``,
``https://user:token@host/``) or its query string (presigned S3 URLs carry ``X-Amz-Signature``
and ``X-Amz-Credential``; other stores put tokens in ``?sig=``). Manifests, ``_config.json``,
registry records, artifacts and log lines get the URL with both replaced by a marker, so the
written form still says where the data lives but not how to get in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "REDACTED"
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without credentials: user-info becomes ``REDACTED@`` and the query ``?REDACTED``.

    Plain paths and URLs without either are returned unchanged; a fragment is dropped (some stores
    put tokens there too). Secrets are not always escaped (AWS secret keys hold '/' and '+'; a
    hand-written one may hold '?' or '#'), so the user-info runs to the last '@' of the URL
    whenever a ':' comes before it or no '/' does: a path that holds both ':' and '@' is
    over-redacted rather than a secret leaked.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    prefix = ""
    at = rest.rfind("@")
    if at >= 0 and (":" in rest[:at] or "/" not in rest[:at]):
        prefix, rest = f"{REDACTED}@", rest[at + 1:]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head, tail = rest[:cut], rest[cut:]
    if tail.startswith("?"):
        tail = f"?{REDACTED}"
    elif tail:
        tail = ""
    return f"{scheme}://{prefix}{head}{tail}"


def redact_text(text: str) -> str:
    """Every URL inside free text (a log line, an error message) redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every URL in a string redacted.

    Use it on anything about to be written as a manifest, a ``_config.json``, a registry record
    or an artifact.
    """
    if isinstance(obj, str):
        return redact_text(obj) if "://" in obj else obj
    if isinstance(obj, Mapping):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URLs in every record's message before any handler sees it.

    Install it on the handlers that leave the process (files, Prefect's API handler):
    ``handler.addFilter(RedactingFilter())``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact_text(message), None
        return True


def install_log_redaction(logger_names: tuple[str, ...] = ("", "prefect", "prefect.flow_runs",
                                                           "prefect.task_runs")) -> None:
    """Add a ``RedactingFilter`` to every handler of these loggers (root and Prefect's, whose API
    handler ships flow-run logs to the server). Idempotent; handlers added later are not covered."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
