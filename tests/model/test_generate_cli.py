"""``cnc generate``: writes the pipeline's image; unreadable or mismatched inputs fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnc_model.loading import load_pipeline
from flows.cli import app
from tests.model.conftest import random_image

runner = CliRunner()


@pytest.fixture()
def inputs(tmp_path):
    depth = np.zeros((64, 64), dtype=np.uint16)
    depth[16:48, 16:48] = 50000
    Image.fromarray(depth).save(tmp_path / "fg_depth.png")  # 16-bit PNG
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(tmp_path / "bg_depth.png")
    Image.fromarray(((depth > 0) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    random_image((40, 40), 1).save(tmp_path / "fg.png")
    random_image((40, 40), 2).save(tmp_path / "bg.jpg")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "small_mask.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def cli(*args: str):
    return runner.invoke(app, ["generate", "--model", "tiny", "--prompt", "a red cube", "--steps", "2", *args])


def test_generate_writes_what_the_pipeline_makes(inputs):
    out = inputs / "out" / "image.png"
    result = cli("--fg-depth", str(inputs / "fg_depth.png"), "--bg-depth", str(inputs / "bg_depth.png"),
                 "--fg-image", str(inputs / "fg.png"), "--bg-image", str(inputs / "bg.jpg"),
                 "--mask", str(inputs / "mask.png"), "--seed", "3", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    written = np.asarray(Image.open(out))
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    fg_depth = np.asarray(Image.open(inputs / "fg_depth.png"), dtype=np.float32) / 65535.0
    expected = pipe("a red cube", fg_depth=fg_depth, bg_depth=np.full((64, 64, 3), 90 / 255, dtype=np.float32),
                    mask=(fg_depth > 0).astype(np.float32)[..., None].repeat(3, -1),
                    fg_exemplar=Image.open(inputs / "fg.png").convert("RGB"),
                    bg_exemplar=Image.open(inputs / "bg.jpg").convert("RGB"),
                    num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    assert written.shape == (64, 64, 3)
    assert np.array_equal(written, np.asarray(expected))


def test_prompt_only(inputs):
    result = cli("--out", str(inputs / "plain.png"))
    assert result.exit_code == 0, result.output
    assert Image.open(inputs / "plain.png").size == (64, 64)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fg-depth", "missing.png"], "no such file"),
        (["--fg-depth", "broken.png"], "not a readable image"),
        (["--fg-depth", "fg_depth.png", "--fg-image", "fg.png", "--mask", "small_mask.png"], "same size"),
        (["--mask", "mask.png"], "only applies to exemplar"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(inputs, args, message):
    args = [str(inputs / a) if a.endswith(".png") else a for a in args]
    result = cli(*args, "--out", str(inputs / "x.png"))
    assert result.exit_code == 2
    assert message in result.output
    assert not (inputs / "x.png").exists()


def test_bad_model_and_output(inputs):
    result = runner.invoke(app, ["generate", "--model", str(inputs / "nope"), "--prompt", "x", "--out", str(inputs / "x.png")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert cli("--out", str(inputs / "x.jpg")).exit_code == 2


def test_official_options_reach_the_pipeline(inputs):
    """--fg-depth-scale/--bg-depth-scale scale the maps, --skip-missing leaves absent parts out,
    --size sets the side; without depth maps the default side is the preset's evaluation size."""
    from cnc_model.presets import get_preset

    out = inputs / "scaled.png"
    result = cli("--fg-depth", str(inputs / "fg_depth.png"), "--bg-depth", str(inputs / "bg_depth.png"),
                 "--fg-depth-scale", "1.5", "--bg-depth-scale", "0.5", "--skip-missing", "--size", "48",
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    fg_depth = np.asarray(Image.open(inputs / "fg_depth.png"), dtype=np.float32) / 65535.0
    expected = pipe("a red cube", fg_depth=fg_depth, bg_depth=np.full((64, 64, 3), 90 / 255, dtype=np.float32),
                    fg_depth_scale=1.5, bg_depth_scale=0.5, missing_conditions="skip", height=48, width=48,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert get_preset("tiny").eval_resolution == 64 and get_preset("sd15").eval_resolution == 768
