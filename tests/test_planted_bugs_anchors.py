"""tests/planted_bugs.py edits source lines by their text: each line it plants a bug in must still
exist, exactly once, or the script silently stops planting that bug (docs/testing.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bugs() -> dict[str, tuple[str, str, str]]:
    spec = importlib.util.spec_from_file_location("planted_bugs", ROOT / "tests" / "planted_bugs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BUGS


@pytest.mark.parametrize("name", sorted(_bugs()))
def test_every_planted_bug_still_finds_its_line(name):
    path, original, planted = _bugs()[name]
    source = (ROOT / path).read_text()
    assert source.count(original) == 1, f"{name}: {path} no longer holds the line the bug edits once"
    assert planted != original
