"""``make demo`` re-runs: the same code resumes its output, other code starts it over."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.demo import NotADemoOutput, _start_over_if_stale, code_fingerprint


def populate(out: Path) -> None:
    for part in ("sources", "ingest", "triplets"):
        (out / part).mkdir(parents=True)
        (out / part / "file").write_text(part)


def test_output_of_other_code_is_started_over_and_the_same_code_keeps_it(tmp_path: Path):
    out = tmp_path / "demo-output"
    populate(out)
    (out / ".demo-code").write_text("made-by-older-code")
    _start_over_if_stale(str(out))
    assert sorted(p.name for p in out.iterdir()) == [".demo-code", "sources"]
    assert (out / ".demo-code").read_text() == code_fingerprint()
    (out / "ingest").mkdir()
    (out / "ingest" / "file").write_text("resumable")
    _start_over_if_stale(str(out))
    assert (out / "ingest" / "file").read_text() == "resumable"


def test_an_output_without_a_stamp_is_refused_and_kept(tmp_path: Path):
    out = tmp_path / "demo-output"
    populate(out)
    with pytest.raises(NotADemoOutput, match="did not make"):
        _start_over_if_stale(str(out))
    assert all((out / part / "file").read_text() == part for part in ("sources", "ingest", "triplets"))
    assert not (out / ".demo-code").exists()


def test_the_cli_refuses_a_foreign_output_with_status_2(tmp_path: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "someones-data"
    populate(out)
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 2 and "did not make" in result.output
    assert (out / "ingest" / "file").read_text() == "ingest"


def test_a_fresh_output_folder_gets_its_stamp(tmp_path: Path):
    out = tmp_path / "new"
    _start_over_if_stale(str(out))
    assert (out / ".demo-code").read_text() == code_fingerprint()
