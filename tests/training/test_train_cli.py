"""``cnc train``: wrong arguments and unusable shards exit 2 with one line before any work; a run
with the in-process executor prints where the model, loss curve and report are."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.test_cli import one_line_error

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["train", *args])


@pytest.mark.parametrize("extra, message", [
    (["--stage", "both"], "unknown --stage 'both'"),
    (["--batch-size", "3", "--workers", "2"], "not a multiple"),
    (["--init", "/nowhere"], "neither tiny, sd15 nor a saved CnC pipeline"),
    (["--max-steps", "0"], "max-steps"),
    (["--executor", "spark"], "executor"),
])
def test_bad_arguments_exit_2_with_one_line(triplets, tmp_path, extra, message):
    line = one_line_error(run("--data", triplets[0], "--out", str(tmp_path / "out"), *extra))
    assert message in line
    assert not (tmp_path / "out" / "_config.json").exists()


def test_missing_shards_exit_2(tmp_path):
    line = one_line_error(run("--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")))
    assert "no triplet shards" in line


def test_a_local_run_prints_the_model_loss_curve_and_report(triplets, tmp_path):
    out = tmp_path / "out"
    result = run("--stage", "local", "--data", triplets[0], "--out", str(out), "--executor", "local",
                 "--batch-size", "8", "--epochs", "1", "--val-fraction", "0")
    assert result.exit_code == 0, result.output
    assert f"model: {out / 'model'}" in result.output and f"loss curve: {out / 'loss_curve.png'}" in result.output
    assert (out / "model" / "model_index.json").exists() and (out / "train_report.json").exists()
