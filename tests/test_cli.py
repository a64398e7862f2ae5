"""The command line fails fast, with one line and status 2, on wrong arguments."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_format(tmp_path):
    line = one_line_error(run("ingest", "--source-format", "zip", "--source", str(tmp_path), "--out", str(tmp_path)))
    assert "unknown --source-format 'zip'" in line and "folder" in line


def test_missing_source(tmp_path):
    line = one_line_error(run("ingest", "--source-format", "folder", "--source", str(tmp_path / "nope"),
                              "--out", str(tmp_path / "out")))
    assert "nope" in line
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"x")
    (tmp_path / "file").write_text("a file, not a folder")
    line = one_line_error(run("ingest", "--source-format", "folder", "--source", str(tmp_path / "src"),
                              "--out", str(tmp_path / "file" / "out")))
    assert "not writable" in line


@pytest.mark.parametrize("bad", [["--size", "2"], ["--shard-size", "0"]])
def test_bad_numbers(tmp_path, bad):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"x")
    one_line_error(run("ingest", "--source-format", "folder", "--source", str(tmp_path / "src"),
                       "--out", str(tmp_path / "out"), *bad))


def test_build_triplets_rejects_an_unknown_preset(tmp_path):
    line = one_line_error(run("build-triplets", "--source-format", "folder", "--source", str(tmp_path),
                              "--out", str(tmp_path / "o"), "--preset", "sdxl"))
    assert "unknown --preset 'sdxl'" in line


def test_commands_import_the_error_helper_not_the_cli_module():
    """Imports point one way: cli -> commands -> errors, never a command back into cli."""
    import ast
    from pathlib import Path

    import flows.commands

    for path in Path(flows.commands.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "flows.cli", f"{path.name} imports flows.cli"


@pytest.mark.slow
def test_build_triplets_checks_the_triplet_side_before_ingest_runs(tmp_path, monkeypatch):
    """A request the triplet stages cannot fit (GPUs for inpainting on a machine without any) is
    status 2 with one line, before ingest has read a source or written anything."""
    import ray

    from tasks.sample_images import write_sample_folder

    monkeypatch.setenv("CNC_RAY_DASHBOARD", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():  # a local Ray of this machine's CPUs and no GPU, as a user gets
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        write_sample_folder(str(tmp_path / "src"), ["chelsea.png"])
        line = one_line_error(run("build-triplets", "--source-format", "folder", "--source", str(tmp_path / "src"),
                                  "--out", str(tmp_path / "out"), "--size", "64", "--inpaint-gpus", "1"))
    finally:
        ray.shutdown()
    assert "GPU" in line
    assert not (tmp_path / "out").exists()


def test_build_triplets_refuses_gpu_stages_on_a_process_pool_before_ingest(tmp_path):
    from tasks.sample_images import write_sample_folder

    write_sample_folder(str(tmp_path / "src"), ["chelsea.png"])
    line = one_line_error(run("build-triplets", "--source-format", "folder", "--source", str(tmp_path / "src"),
                              "--out", str(tmp_path / "out"), "--inpaint-gpus", "1", "--executor", "processes"))
    assert "run on Ray" in line
    assert not (tmp_path / "out").exists()
