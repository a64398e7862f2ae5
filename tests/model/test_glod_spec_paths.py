"""GLoD spec files cannot reach outside their folder, and sizes are bounded before memory is spent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import PIL.Image
import pytest

from cnc_model.glod.spec import MAX_SIDE, SpecError, load_spec, parse_spec


def _spec(**changes: object) -> dict:
    spec = {"width": 64, "height": 64, "global_prompts": [{"text": "a man and a woman"}],
            "local_prompts": [{"text": "a man with a beard", "object": "man", "box": [0, 0, 32, 64]}]}
    return {**spec, **changes}


def _with_mask(tmp_path: Path, mask: str) -> Path:
    local = {"text": "a man with a beard", "object": "man", "mask": mask}
    (tmp_path / "spec" / "s.json").write_text(json.dumps(_spec(local_prompts=[local])))
    return tmp_path / "spec" / "s.json"


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    (tmp_path / "spec" / "sub").mkdir(parents=True)
    PIL.Image.new("L", (64, 64), 255).save(tmp_path / "spec" / "sub" / "in.png")
    PIL.Image.new("L", (64, 64), 255).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", tmp_path / "spec" / "link.png")
    return tmp_path


@pytest.mark.parametrize("mask", ["../outside.png", "sub/../../outside.png", "link.png", "{abs}"])
def test_a_mask_path_that_leaves_the_spec_folder_is_refused(layout: Path, mask: str) -> None:
    mask = mask.format(abs=layout / "outside.png")
    with pytest.raises(SpecError, match=r"local_prompts\.0\.mask: .* is not inside the spec's folder"):
        load_spec(_with_mask(layout, mask))


def test_a_mask_inside_the_spec_folder_loads(layout: Path) -> None:
    spec = load_spec(_with_mask(layout, "sub/in.png"))
    assert spec.local_prompts[0].mask == str(layout / "spec" / "sub" / "in.png")


def test_a_fifo_mask_is_refused_without_blocking(layout: Path) -> None:
    os.mkfifo(layout / "spec" / "pipe.png")
    with pytest.raises(SpecError, match="is not a regular file"):
        load_spec(_with_mask(layout, "pipe.png"))


def test_width_height_and_mask_sides_are_bounded(layout: Path) -> None:
    with pytest.raises(SpecError, match="width"):
        parse_spec(_spec(width=MAX_SIDE + 8))
    with pytest.raises(SpecError, match="height"):
        parse_spec(_spec(height=10**9))
    from tests.fixtures.bad_inputs import bomb_png

    (layout / "spec" / "bomb.png").write_bytes(bomb_png(MAX_SIDE * 3, 64))
    with pytest.raises(SpecError, match="above 4096 px a side"):
        load_spec(_with_mask(layout, "bomb.png"))
