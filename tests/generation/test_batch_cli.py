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


def _png(array, fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write_triplets(url: str, n: int) -> str:
    """Triplet-shaped samples (src, fg, bg, mask, fg/bg depth, caption), one incomplete."""
    import numpy as np

    from tasks.shards import ShardWriter, shard_urls

    rng = np.random.default_rng(0)
    with ShardWriter(*shard_urls(url, 0)) as writer:
        for i in range(n):
            rgb = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[16:48, 8 + i:40 + i] = 255
            depth = (mask.astype(np.uint16) * 200)
            files = {"src.jpg": _png(rgb, "JPEG"), "fg.png": _png(rgb * (mask[..., None] > 0)),
                     "bg.jpg": _png(rgb, "JPEG"), "mask.png": _png(mask), "depth_fg.png": _png(depth),
                     "depth_bg.png": _png(np.full((64, 64), 3000, np.uint16)), "txt": f"object {i}".encode()}
            writer.add_sample(f"t{i:03d}", f"t{i:03d}", files)
        writer.add_sample("partial", "partial", {"src.jpg": _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                                                                  "JPEG")})
        writer.commit()
    return url


def test_generate_batch_from_a_triplet_set(tmp_path):
    from tasks.shards import iter_tar_samples

    triplets = write_triplets(str(tmp_path / "triplets"), 3)
    out = tmp_path / "gen"
    result = runner.invoke(app, ["generate-batch", "--triplets", triplets, "--setting", "both", "--steps", "1",
                                 "--out", str(out), "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert "3 triplets" in result.output and "1 incomplete skipped" in result.output
    assert "3 rows -> 3 images, 0 rejects" in result.output
    samples = list(iter_tar_samples(str(out / "shards" / "shard-000000.tar")))
    row = json.loads(samples[1]["json"])
    assert row["prompt"] == "object 1" and row["seed"] == 1
    assert {row[k] for k in ("fg_depth", "bg_depth", "fg_exemplar", "bg_exemplar", "mask")} == {
        "t001.depth_fg.png", "t001.depth_bg.png", "t001.fg.png", "t001.bg.jpg", "t001.mask.png"}
    assert (out / "tables" / "conditions" / "t001.depth_fg.png").exists()
    result = runner.invoke(app, ["generate-batch", "--triplets", triplets, "--rows", "x.jsonl", "--out", str(out)])
    assert result.exit_code == 2 and "exactly one of --rows" in result.output
