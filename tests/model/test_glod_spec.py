"""The GLoD prompt-spec format: parsing YAML/JSON and clear errors for bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnc_model.glod.spec import GLoDSpec, SpecError, load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _spec(**changes) -> dict:
    data = {
        "width": 512,
        "height": 256,
        "global_prompts": [{"text": "a man is talking with a woman", "weight": 7.5}],
        "local_prompts": [{"text": "a man with white beard", "object": "man", "box": [0, 0, 256, 256], "weight": 5}],
    }
    data.update(changes)
    return data


def _local(**changes) -> dict:
    local = {"text": "a man with white beard", "object": "man", "box": [0, 0, 256, 256]}
    local.update(changes)
    return local


def test_valid_spec_and_defaults() -> None:
    spec = parse_spec(_spec())
    assert spec.local_prompts[0].box == (0, 0, 256, 256) and spec.local_prompts[0].weight == 5.0
    assert spec.local_steps == (0.0, 1.0) and spec.layout_guidance.enabled  # the reference's guidance, on
    assert spec.global_index_of(spec.local_prompts[0]) == 0
    single = GLoDSpec.single("a cat", 6.0)
    assert single.global_prompts[0].weight == 6.0 and single.local_prompts == []


@pytest.mark.parametrize("name", ["glod_spec.yaml", "glod_spec_sd15.yaml"])
def test_example_specs_are_valid(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert spec.local_prompts and spec.global_prompts


def test_yaml_and_json_give_the_same_spec(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "s.json").write_text(json.dumps(_spec()))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_spec()))
    assert load_spec(tmp_path / "s.json") == load_spec(tmp_path / "s.yaml") == parse_spec(_spec())


def test_mask_paths_are_relative_to_the_spec_file(tmp_path: Path) -> None:
    import PIL.Image

    PIL.Image.new("L", (64, 32), 255).save(tmp_path / "m.png")
    (tmp_path / "s.json").write_text(json.dumps(_spec(local_prompts=[_local(box=None, mask="m.png")])))
    assert load_spec(tmp_path / "s.json").local_prompts[0].mask == str(tmp_path / "m.png")


def test_missing_or_unreadable_masks_name_their_field(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    locals_ = [_local(box=None, mask="gone.png"), _local(), _local(box=None, mask="notes.png")]
    (tmp_path / "s.json").write_text(json.dumps(_spec(local_prompts=locals_)))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.json")
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid GLoD spec {tmp_path / 's.json'}:" and len(lines) == 3
    assert lines[1].startswith("  local_prompts.0.mask: no such file") and "gone.png" in lines[1]
    assert lines[2].startswith("  local_prompts.2.mask: ") and "not a readable image" in lines[2]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"local_prompts": [_local(box=[300, 0, 600, 100])]}, r"local_prompts\.0\.box: \[300\.0, 0\.0, 600\.0, 100\.0\] lies outside the 512x256 image"),
        ({"local_prompts": [_local(box=[-1, 0, 10, 10])]}, "lies outside"),
        ({"local_prompts": [_local(box=[10, 10, 5, 20])]}, "x1 > x0"),
        ({"local_prompts": [_local(object="dog")]}, r"local_prompts\.0\.object: 'dog' is not a word of any global prompt"),
        ({"local_prompts": [_local(object="ma")]}, "is not a word"),
        ({"local_prompts": [_local(global_index=3)]}, "only 1 global prompt"),
        ({"local_prompts": [_local(text="  ")]}, r"local_prompts\.0\.text: must not be empty"),
        ({"global_prompts": [{"text": ""}]}, r"global_prompts\.0\.text: must not be empty"),
        ({"global_prompts": []}, "global_prompts: List should have at least 1 item"),
        ({"global_prompts": [{"text": "a man", "weight": "high"}]}, r"global_prompts\.0\.weight: must be a number, got 'high'"),
        ({"local_prompts": [_local(weight="5")]}, r"local_prompts\.0\.weight: must be a number, got '5'"),
        ({"local_prompts": [_local(weight=True)]}, "must be a number, got True"),
        ({"local_prompts": [_local(box=None)]}, "exactly one of `box` or `mask`"),
        ({"local_prompts": [_local(mask="m.png")]}, "exactly one of `box` or `mask`"),
        ({"local_steps": [0.8, 0.2]}, "local_steps: need 0 <= start <= end <= 1"),
        ({"layout_guidance": {"strength": -1}}, "greater than or equal to 0"),
        ({"layout_guidance": {"layers": ["left"]}}, "subset of down, mid, up"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(_spec(**changes), "test.yaml")


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(local_prompts=[_local(object="dog"), _local(box=[0, 0, 1000, 10])]))
    text = str(info.value)
    assert "local_prompts.0.object" in text and "local_prompts.1.box" in text


def test_field_errors_and_cross_field_errors_are_reported_together() -> None:
    spec = _spec(
        global_prompts=[{"text": "a man is talking with a woman", "weight": "high"}],
        local_prompts=[_local(object="dog"), _local(box=[0, 0, 1000, 10]), _local(text="")],
        local_steps=[0.9, 0.1],
    )
    with pytest.raises(SpecError) as info:
        parse_spec(spec, "s.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid GLoD spec s.yaml:"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "global_prompts.0.weight", "local_prompts.1.box", "local_prompts.2.text", "local_steps"]
    # the object check needs every global prompt valid: fix the weight, and it reports the object too
    spec["global_prompts"][0]["weight"] = 7.5
    with pytest.raises(SpecError) as info:
        parse_spec(spec, "s.yaml")
    assert "local_prompts.0.object: 'dog' is not a word" in str(info.value)
    assert "local_prompts.1.box" in str(info.value) and "local_prompts.2.text" in str(info.value)


def test_unparseable_and_non_mapping_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")
