"""GLoD sweeps: the grid becomes rows, bad specs become rejects, images match `cnc glod`, Pareto front."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.generation.glod_render import GLoDRenderer
from tasks.generation.sweep import SweepError, load_sweep, parse_sweep
from tasks.generation.sweep_report import alignment_plot, contact_sheet, pareto_front

SPEC_A = {"width": 512, "height": 512, "global_prompts": [{"text": "a man is talking with a woman"}],
          "local_prompts": [{"text": "an old man with a white beard", "object": "man", "box": [0, 0, 256, 512]}]}
SPEC_B = {"width": 512, "height": 256, "global_prompts": [{"text": "a cat on a red sofa"}],
          "local_prompts": [{"text": "a fluffy grey cat", "object": "cat", "box": [300, 40, 500, 250]}]}


@pytest.fixture
def sweep_file(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(SPEC_A))
    sweep = {"model": "tiny", "steps": 2, "specs": {"talk": "a.yaml", "cat": SPEC_B},
             "grid": {"local_weight": [2.0, 6.0], "seed": [0, 1]},
             "contact_sheet": {"rows": "local_weight", "columns": "seed"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    return tmp_path / "sweep.yaml"


def test_grid_becomes_rows_with_the_point_applied(sweep_file):
    sweep = load_sweep(sweep_file)
    assert len(sweep.rows) == 8 and sweep.axes == ["local_weight", "seed"]
    assert [r.id for r in sweep.rows][:4] == ["talk-00000", "talk-00001", "talk-00002", "talk-00003"]
    last = sweep.rows[-1]
    assert last.spec_name == "cat" and last.point == {"local_weight": 6.0, "seed": 1} and last.seed == 1
    assert last.spec["local_prompts"][0]["weight"] == 6.0 and last.spec["local_prompts"][0]["text"] == "a fluffy grey cat"
    assert sweep.rows[0].spec["global_prompts"][0]["text"] == "a man is talking with a woman"
    assert not any(r.reason for r in sweep.rows)


def test_invalid_specs_become_reject_rows_and_bad_sweeps_one_error(tmp_path):
    bad_word = {**SPEC_A, "local_prompts": [{**SPEC_A["local_prompts"][0], "object": "dog"}]}
    sweep = parse_sweep({"specs": {"ok": SPEC_A, "bad": bad_word, "gone": "missing.yaml", "out": "../x.yaml"},
                         "grid": {"global_weight": [5.0, -1.0]}}, tmp_path)
    reasons = {r.id: r.reason for r in sweep.rows}
    assert reasons == {"ok-00000": "", "ok-00001": "", "bad-00000": "invalid_spec", "bad-00001": "invalid_spec",
                       "gone-00000": "missing_spec", "gone-00001": "missing_spec",
                       "out-00000": "path_outside_root", "out-00001": "path_outside_root"}
    # global_weight -1 is a valid weight for GLoD (negative guidance); the message names bad fields
    assert "dog" in next(r.message for r in sweep.rows if r.id == "bad-00000")
    for data, match in (({"specs": {"a": SPEC_A}, "grid": {"temperature": [1]}}, "unknown grid axis"),
                        ({"specs": {}}, "specs"), ({"specs": {"a b": SPEC_A}}, "spec name"),
                        ({"specs": {"a": SPEC_A}, "steps": 0}, "steps"),
                        ({"specs": {"a": SPEC_A}, "grid": {"seed": [0]}, "contact_sheet": {"rows": "x"}}, "contact_sheet")):
        with pytest.raises(SweepError, match=match):
            parse_sweep(data, tmp_path)


def test_sweep_images_are_cnc_glods_and_are_scored(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    renderer = GLoDRenderer("tiny", clip="tiny", steps=sweep.steps)
    rows = [sweep.rows[1], sweep.rows[6]]  # talk: weight 2 seed 1; cat: weight 6 seed 0
    outcomes = renderer.render(rows)
    for row, outcome in zip(rows, outcomes):
        assert outcome.png and -1 <= outcome.global_score <= 1 and -1 <= outcome.local_score <= 1
        spec_path = tmp_path / f"{row.id}.yaml"
        spec_path.write_text(yaml.safe_dump(row.spec))
        out = tmp_path / f"{row.id}.png"
        result = CliRunner().invoke(app, ["glod", "--model", "tiny", "--spec", str(spec_path), "--out", str(out),
                                          "--seed", str(row.seed), "--steps", "2", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(io.BytesIO(outcome.png)))), row.id
    assert Image.open(io.BytesIO(outcomes[1].png)).size == (128, 64)  # the cat spec's 2:1 aspect


def test_pareto_front_and_figures():
    pts = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.2, 0.2), (float("nan"), 1.0)]
    assert pareto_front(pts) == [0, 1, 3]
    results = [{"id": f"r{i}", "spec_name": "s", "point": {"w": i % 2, "seed": i // 2}, "global_score": g,
                "local_score": l} for i, (g, l) in enumerate(pts)]
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(png, format="PNG")
    sheet = contact_sheet(results, {"r0": png.getvalue()}, "w", "seed", tile=20)
    assert sheet.size == (110 + 3 * 20, 32 + 2 * 20)
    assert sheet.getpixel((110 + 5, 32 + 5)) == (255, 0, 0)  # r0: w=0 (row 0), seed=0 (column 0)
    assert sheet.getpixel((110 + 25, 32 + 5)) == (60, 0, 60)  # r2: no image
    assert alignment_plot(results).size == (420, 420)


def test_sweep_job_two_specs_two_weights_two_seeds(sweep_file, tmp_path):
    import pyarrow.parquet as pq

    from tasks.generation.sweep_job import run_sweep

    out = str(tmp_path / "sweep-out")
    result = run_sweep(sweep_file, out, shard_size=3, executor="local")
    assert (result.rows, result.images, result.rejects) == (8, 8, 0)
    table = pq.read_table(result.results_url).to_pylist()
    assert len(table) == 8 and all(r["status"] == "ok" for r in table)
    assert {(r["spec_name"], r["grid_local_weight"], r["grid_seed"]) for r in table} == {
        (s, w, d) for s in ("talk", "cat") for w in ("2.0", "6.0") for d in ("0", "1")}
    assert all(-1 <= r["global_score"] <= 1 and -1 <= r["local_score"] <= 1 for r in table)
    assert any(r["pareto"] for r in table)
    names = sorted(u.rsplit("/", 1)[-1] for u in result.figure_urls)
    assert names == ["alignment.png", "contact-cat.png", "contact-talk.png"]
    assert Image.open(f"{out}/contact-talk.png").size == (110 + 2 * 96, 32 + 2 * 96)
    again = run_sweep(sweep_file, out, shard_size=3, executor="local", resume=True)
    assert again.shards_written == 0 and again.shards_skipped == 3 and again.images == 8
