"""Sample keys are part of the shard format: pinned to literal values, not recomputed by the code
under test (a changed key would orphan every resumed or extended data set)."""

from __future__ import annotations

import pytest

from tasks.ingest import sample_key


@pytest.mark.parametrize("source_id, key", [
    ("photos/cat.jpg", "8c926b720fe78c69e8b4"),
    ("photos/cat.JPG", "807c413b38de33b166d0"),  # case matters
    ("café/é.png", "6c1e2ec73fa4065bdb86"),  # UTF-8 bytes of the id
])
def test_sample_key_is_the_pinned_value(source_id: str, key: str) -> None:
    assert sample_key(source_id) == key


def test_sample_key_is_filename_safe_and_accepts_lone_surrogates() -> None:
    key = sample_key("bad\udcffname.jpg")  # os.fsdecode of a non-UTF-8 file name
    assert len(key) == 20 and set(key) <= set("0123456789abcdef")
    assert key != sample_key("badname.jpg")
