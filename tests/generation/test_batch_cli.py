"""``cnc generate-batch`` and ``cnc glod-sweep`` from the command line: summaries and one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_generate_batch_cli_writes_shards_and_names_bad_tables(tmp_path):
    table = tmp_path / "jobs.jsonl"
    table.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}", "seed": i, "steps": 1})
                               for i in range(3)) + "\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate-batch", "--rows", str(table), "--out", str(out), "--executor", "local",
                                 "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    assert "3 rows -> 3 images, 0 rejects in 2 shards" in result.output
    result = runner.invoke(app, ["generate-batch", "--rows", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "o2"),
                                 "--executor", "local"])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "jobs.csv").write_text("id,prompt\n")
    result = runner.invoke(app, ["generate-batch", "--rows", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "o3"),
                                 "--executor", "local"])
    assert result.exit_code == 2 and ".parquet or .jsonl" in result.output


def test_glod_sweep_cli_names_a_bad_sweep(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("specs: {a: a.yaml}\ngrid: {temperature: [1]}\n")
    result = runner.invoke(app, ["glod-sweep", "--sweep", str(sweep), "--out", str(tmp_path / "o"),
                                 "--executor", "local"])
    assert result.exit_code == 2 and "unknown grid axis" in result.output
