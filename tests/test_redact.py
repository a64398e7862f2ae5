"""URLs lose their credentials (user-info, query strings) before being written or logged."""

from __future__ import annotations

import logging

import pytest

from tasks import manifest, storage
from tasks.redact import RedactingFilter, redact_obj, redact_text, redact_url


@pytest.mark.parametrize("url, expected", [
    ("s3://AKIA:se/cr+et@bucket/x/y", "s3://REDACTED@bucket/x/y"),
    ("s3://token@bucket/x", "s3://REDACTED@bucket/x"),
    ("s3://AKIA:se?cr#et@bucket/x?y=1", "s3://REDACTED@bucket/x?REDACTED"),  # unescaped '?' / '#' in a secret
    ("https://u:p@host:9000/a?X-Amz-Signature=abc&X-Amz-Credential=k#frag", "https://REDACTED@host:9000/a?REDACTED"),
    ("https://host/blob?sig=secret", "https://host/blob?REDACTED"),
    ("s3://bucket/user@example.com/f.jpg", "s3://bucket/user@example.com/f.jpg"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("/data/a?b.jpg", "/data/a?b.jpg"),  # a plain path is not a URL
    ("memory://x/y", "memory://x/y"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_nested_objects_and_free_text():
    obj = {"source": "s3://K:S@b/src", "shards": ["https://h/t.tar?sig=1", "rel/p"], "n": 3,
           "nested": {"msg": "read s3://K:S@b/x failed"}}
    assert redact_obj(obj) == {"source": "s3://REDACTED@b/src", "shards": ["https://h/t.tar?REDACTED", "rel/p"],
                               "n": 3, "nested": {"msg": "read s3://REDACTED@b/x failed"}}
    assert redact_text("a s3://K:S@b/x b") == "a s3://REDACTED@b/x b"


def test_write_manifest_persists_no_secret(memory_url):
    url = storage.join(memory_url, "manifest.json")
    manifest.write_manifest(url, {"config": {"source": "s3://AKIA:SECRET@bucket/in?X-Amz-Signature=s"}})
    raw = storage.read_bytes(url)
    assert b"SECRET" not in raw and b"AKIA" not in raw and b"X-Amz" not in raw
    assert storage.read_json(url) == manifest.redacted({"config": {"source": "s3://AKIA:SECRET@bucket/in?x"}})


def test_logging_filter_redacts_the_formatted_message(caplog):
    log = logging.getLogger("cnc-redact-test")
    handler_filter = RedactingFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="cnc-redact-test"):
            log.info("joining %s", "s3://AKIA:SECRET@bucket/x")
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert caplog.messages == ["joining s3://REDACTED@bucket/x"]


def test_installed_redaction_covers_handlers_of_the_root_logger():
    import io

    from tasks.redact import install_log_redaction

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logging.getLogger("cnc.some.module").warning("writing %s", "s3://AKIA:SECRET@bucket/out")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().strip() == "writing s3://REDACTED@bucket/out"
