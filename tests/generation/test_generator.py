"""Generation rows: each row's image is `cnc generate`'s for it alone; bad rows become reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.generation.conditions import resolve
from tasks.generation.generator import BatchGenerator
from tasks.generation.rows import RowError, parse_row, settings_key
from tests.model.conftest import random_image


@pytest.fixture(scope="module")
def conditions(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditions")
    depth = np.zeros((64, 64), dtype=np.uint16)
    depth[8:40, 4:30] = 52000  # object on the left
    Image.fromarray(depth).save(root / "fg_left.png")
    depth = np.zeros((64, 64), dtype=np.uint16)
    depth[20:60, 34:62] = 40000  # object on the right
    Image.fromarray(depth).save(root / "fg_right.png")
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(root / "bg.png")
    random_image((40, 40), 1).save(root / "fg.png")
    random_image((40, 40), 2).save(root / "bg.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


@pytest.fixture(scope="module")
def generator(conditions):
    return BatchGenerator("tiny", batch_size=3, condition_root=str(conditions))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_rows_match_cnc_generate_alone_and_do_not_depend_on_their_batch(generator, conditions, tmp_path):
    rows = [parse_row(r) for r in (
        {"id": "a", "prompt": "a red cube", "seed": 3, "steps": 2, "fg_depth": "fg_left.png", "bg_depth": "bg.png"},
        {"id": "b", "prompt": "a blue ball", "seed": 4, "steps": 2, "fg_depth": "fg_right.png", "bg_depth": "bg.png"},
        {"id": "c", "prompt": "a red cube", "seed": 5, "steps": 2, "fg_depth": "fg_left.png", "bg_depth": "bg.png"},
        {"id": "d", "prompt": "a green tree", "seed": 3, "steps": 2, "fg_exemplar": "fg.png", "bg_exemplar": "bg.jpg"},
    )]
    generator.batch_size = 3
    batched = generator.generate(rows)
    generator.batch_size = 1
    alone = generator.generate(rows)
    assert [o.row_id for o in batched] == ["a", "b", "c", "d"] and all(o.png for o in batched)
    for b, a in zip(batched, alone):
        # floating-point sums in a batched UNet may round one 8-bit level differently, no more
        assert np.abs(_pixels(b.png) - _pixels(a.png)).max() <= 1, b.row_id
    assert np.abs(_pixels(batched[0].png) - _pixels(batched[2].png)).mean() > 5  # the seed matters
    runner = CliRunner()
    for row, outcome in zip(rows, alone):
        args = ["generate", "--model", "tiny", "--prompt", row.prompt, "--steps", "2", "--seed", str(row.seed),
                "--out", str(tmp_path / f"{row.id}.png")]
        for name, option in (("fg_depth", "--fg-depth"), ("bg_depth", "--bg-depth"), ("fg_exemplar", "--fg-image"),
                             ("bg_exemplar", "--bg-image")):
            if getattr(row, name):
                args += [option, str(conditions / getattr(row, name))]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert np.array_equal(_pixels((tmp_path / f"{row.id}.png").read_bytes()), _pixels(outcome.png)), row.id
    assert generator.generate(rows[:2])[1].png == alone[1].png  # same row, same bytes


def test_bad_rows_become_reasons_and_good_rows_still_render(generator):
    rows = [parse_row(r) for r in (
        {"id": "ok", "prompt": "a red cube", "seed": 1, "steps": 1},
        {"id": "missing", "prompt": "x", "seed": 1, "steps": 1, "fg_depth": "nowhere.png"},
        {"id": "corrupt", "prompt": "x", "seed": 1, "steps": 1, "fg_depth": "broken.png"},
        {"id": "escape", "prompt": "x", "seed": 1, "steps": 1, "bg_depth": "../outside.png"},
    )]
    outcomes = {o.row_id: o for o in generator.generate(rows)}
    assert outcomes["ok"].png and not outcomes["ok"].reason
    assert {k: o.reason for k, o in outcomes.items() if k != "ok"} == {
        "missing": "missing_condition", "corrupt": "corrupt_condition", "escape": "path_outside_root"}
    assert all(o.png is None for k, o in outcomes.items() if k != "ok")


@pytest.mark.parametrize("raw, reason", [
    ({"id": "x", "prompt": "p", "seed": 1, "colour": "red"}, "unknown_field"),
    ({"id": "x", "prompt": "p"}, "missing_field"),
    ({"id": "x/../y", "prompt": "p", "seed": 1}, "bad_id"),
    ({"id": "x", "prompt": "p", "seed": 1, "steps": 0}, "bad_value"),
    ({"id": "x", "prompt": "p", "seed": 1.5}, "bad_value"),
    ({"id": "x", "prompt": "p", "seed": 1, "height": 60}, "bad_value"),
    ({"id": "x", "prompt": 3, "seed": 1}, "bad_prompt"),
    ({"id": "x", "prompt": "p", "seed": 1, "mask": "m.png"}, "bad_value"),
])
def test_parse_row_rejects_with_a_reason(raw, reason):
    with pytest.raises(RowError) as info:
        parse_row(raw)
    assert info.value.reason == reason


def test_settings_key_groups_by_sampler_and_condition_kinds_not_by_prompt_or_seed():
    base = {"id": "a", "prompt": "p", "seed": 1}
    same = parse_row({**base, "id": "b", "prompt": "q", "seed": 9, "negative_prompt": "blurry"})
    assert settings_key(parse_row(base)) == settings_key(same)
    assert settings_key(parse_row(base)) != settings_key(parse_row({**base, "steps": 20}))
    assert settings_key(parse_row(base)) != settings_key(parse_row({**base, "fg_depth": "d.png"}))
    assert parse_row({**base, "negative_prompt": None, "fg_depth": ""}).conditions() == {}


def test_resolve_keeps_paths_under_the_root():
    assert resolve("a/b.png", "s3://bucket/cond") == "s3://bucket/cond/a/b.png"
    assert resolve("s3://bucket/cond/x.png", "s3://bucket/cond/") == "s3://bucket/cond/x.png"
    for bad in ("s3://bucket/other/x.png", "s3://bucket/cond/../x.png", "/etc/passwd", "a/../../x.png"):
        with pytest.raises(RowError, match="condition root"):
            resolve(bad, "s3://bucket/cond")
