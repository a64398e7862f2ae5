"""``cnc evaluate``: tiny preset prints a labelled table and paths; real preset names the missing file."""

from __future__ import annotations

from typer.testing import CliRunner

from tasks import storage
from tests.evaluation.test_evaluation_job import _images, write_set
from flows.cli import app

runner = CliRunner()


def test_evaluate_tiny_writes_metrics_and_figure(tmp_path):
    real = write_set(str(tmp_path / "real"), _images(0, 6, bright=False), 3)
    gen = write_set(str(tmp_path / "gen"), _images(1, 6, bright=True), 3, ["a red cube"] * 6)
    out = str(tmp_path / "eval")
    result = runner.invoke(app, ["evaluate", "--preset", "tiny", "--executor", "local", "--real", real,
                                 "--setting", f"depth={gen}", "--out", out, "--splits", "2"])
    assert result.exit_code == 0, result.output
    assert "plumbing" in result.output and "setting=depth" in result.output and "paper_fid=22.257" in result.output
    metrics = storage.read_json(f"{out}/metrics.json")
    assert metrics["settings"]["depth"]["images"] == 6 and metrics["plumbing"] is True
    assert storage.exists(f"{out}/metrics.png")


def test_evaluate_names_the_missing_inception_file_and_bad_settings(tmp_path):
    base = ["evaluate", "--real", str(tmp_path), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*base, "--setting", f"depth={tmp_path}"])
    assert result.exit_code == 2 and "--inception-weights" in result.output
    assert "weights-inception-2015-12-05-6726825d.pth" in result.output
    missing = tmp_path / "w" / "pt_inception.pth"
    real = write_set(str(tmp_path / "real"), _images(0, 4, bright=False), 4)
    result = runner.invoke(app, ["evaluate", "--real", real, "--out", str(tmp_path / "o2"), "--executor", "local",
                                 "--setting", f"depth={real}", "--inception-weights", str(missing)])
    assert result.exit_code == 2 and str(missing) in result.output
    result = runner.invoke(app, [*base, "--preset", "tiny", "--setting", "depth"])
    assert result.exit_code == 2 and "NAME=URL" in result.output
