"""``cnc glod`` with the tiny preset: image, debug pictures, seeds, clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from typer.testing import CliRunner

from flows.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "glod_spec.yaml"
runner = CliRunner()


def _glod(*args: str):
    return runner.invoke(app, ["glod", *args])


def test_renders_the_example_with_debug_pictures(tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    result = _glod("--spec", str(EXAMPLE), "--out", str(out), "--steps", "2", "--seed", "1", "--debug")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["img.attention0-man.png", "img.attention1-woman.png", "img.png", "img.region0.png", "img.region1.png"]
    assert PIL.Image.open(out).size == (64, 64)  # tiny renders the 512x512 spec at 64x64
    region = np.asarray(PIL.Image.open(tmp_path / "img.region0.png"))
    # box [16, 64, 256, 512] of 512 -> left half, below the first eighth; zero outside it
    assert region.shape == (64, 64) and region[:8].max() == 0 and region[:, 40:].max() == 0 and region[32, 16] == 255
    again = tmp_path / "again.png"
    assert _glod("--spec", str(EXAMPLE), "--out", str(again), "--steps", "2", "--seed", "1").exit_code == 0
    assert np.array_equal(np.asarray(PIL.Image.open(again)), np.asarray(PIL.Image.open(out)))
    other = tmp_path / "other.png"
    assert _glod("--spec", str(EXAMPLE), "--out", str(other), "--steps", "2", "--seed", "2").exit_code == 0
    assert not np.array_equal(np.asarray(PIL.Image.open(other)), np.asarray(PIL.Image.open(out)))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"global_prompts": [{"text": "a cat"}], "local_prompts": [{"text": "x", "object": "dog", "box": [0, 0, 8, 8]}]},
         "'dog' is not a word of any global prompt"),
        ({"global_prompts": [{"text": "a cat"}], "local_prompts": [{"text": "x", "object": "cat", "box": [0, 0, 600, 8]}]},
         "lies outside the 512x512 image"),
        ({"global_prompts": [{"text": "a cat", "weight": "7"}]}, "must be a number"),
    ],
)
def test_bad_spec_is_one_line_error(tmp_path: Path, spec: dict, message: str) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    result = _glod("--spec", str(path), "--out", str(tmp_path / "x.png"))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0] and lines[0].startswith(f"error: invalid GLoD spec {path}: ")
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    result = _glod("--spec", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "cannot read --spec" in result.output
    result = _glod("--spec", str(EXAMPLE), "--out", str(tmp_path / "x.jpg"))
    assert result.exit_code == 2 and "must name a .png" in result.output
    result = _glod("--spec", str(EXAMPLE), "--out", str(tmp_path / "x.png"), "--device", "tpu")
    assert result.exit_code == 2 and "--device must be auto, cpu or cuda" in result.output
    result = _glod("--spec", str(EXAMPLE), "--out", str(tmp_path / "x.png"), "--device", "cpu", "--half")
    assert result.exit_code == 2 and "--half needs a GPU" in result.output
    # an output that cannot be written fails before any rendering, in one line
    (tmp_path / "file").write_text("")
    result = _glod("--spec", str(EXAMPLE), "--out", str(tmp_path / "file" / "x.png"))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --out: ") and "not writable" in lines[0]


def test_model_folder_renders_like_the_tiny_preset(tmp_path: Path) -> None:
    from cnc_model.glod.pipeline_glod import GLoDPipeline
    from cnc_model.tiny import tiny_sd_components

    GLoDPipeline(**tiny_sd_components(0)).save_pretrained(tmp_path / "model")
    args = ["--spec", str(EXAMPLE), "--steps", "2", "--seed", "3"]
    assert _glod(*args, "--out", str(tmp_path / "tiny.png")).exit_code == 0
    # the folder renders at the spec's own size (512): ask for the tiny size through a copy of the spec
    spec = tmp_path / "small.yaml"
    spec.write_text(EXAMPLE.read_text().replace("width: 512", "width: 64").replace("height: 512", "height: 64")
                    .replace("[16, 64, 256, 512]", "[2, 8, 32, 64]").replace("[256, 64, 496, 512]", "[32, 8, 62, 64]")
                    .replace("feather: 16", "feather: 2"))
    result = _glod("--spec", str(spec), "--steps", "2", "--seed", "3", "--model", str(tmp_path / "model"),
                   "--out", str(tmp_path / "dir.png"))
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.asarray(PIL.Image.open(tmp_path / "dir.png"), dtype=np.int16),
                               np.asarray(PIL.Image.open(tmp_path / "tiny.png"), dtype=np.int16), rtol=0, atol=1)
    result = _glod("--spec", str(spec), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and result.output.startswith("error: ")
