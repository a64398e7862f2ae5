"""build-triplets on a cluster: the Jobs API submission says what the local path would run."""

from __future__ import annotations

import json
import shlex

import pytest

from flows.params import BuildTripletsParams
from flows.triplets_flow import cluster_job_spec, triplet_stage_options
from tasks.triplets.cluster_entry import RESULT_PREFIX, parse_result


def test_the_spec_carries_ingest_then_triplets_and_the_flow_run_id():
    params = BuildTripletsParams(source="s3://bucket/src", out="s3://bucket/out", preset="sd15", size=256,
                                 shard_size=16, inpaint_steps=7, clip=True,
                                 stages={"inpaint": {"num_gpus": 1, "batch_size": 4}})
    spec = cluster_job_spec(params, "run-42")
    argv = shlex.split(spec.entrypoint)
    assert argv[:3] == ["python", "-m", "tasks.triplets.cluster_entry"] and len(argv) == 4
    body = json.loads(argv[3])
    assert body["ingest"] == {"source_format": "folder", "source": "s3://bucket/src", "out": "s3://bucket/out/ingest",
                              "size": 256, "shard_size": 16, "limit": None}
    trip = body["triplets"]
    assert trip["out"] == "s3://bucket/out/triplets" and trip["preset"] == "sd15" and trip["clip"] is True
    assert trip["stages"]["inpaint"]["num_gpus"] == 1 and trip["stages"]["inpaint"]["batch_size"] == 4
    assert trip["stages"]["inpaint"]["cfg"] == {"num_inference_steps": 7}
    from dataclasses import asdict

    assert trip["stages"] == {k: asdict(v) for k, v in triplet_stage_options(params).items()}
    assert spec.key == "run-42" and spec.metadata["prefect_flow_run_id"] == "run-42"


@pytest.mark.parametrize("field", ["source", "out"])
def test_urls_with_credentials_are_refused_before_submission(field):
    urls = {"source": "s3://bucket/src", "out": "s3://bucket/out"}
    urls[field] = "s3://AKIA:SECRET@bucket/x"
    with pytest.raises(ValueError, match=f"{field} carries credentials"):
        cluster_job_spec(BuildTripletsParams(**urls), "run-1")


def test_the_result_line_is_read_back():
    lines = ["noise", RESULT_PREFIX + json.dumps({"ingest": {"n": 1}, "triplets": {"n": 2}})]
    assert parse_result(lines) == {"ingest": {"n": 1}, "triplets": {"n": 2}}
    with pytest.raises(ValueError):
        parse_result(["no result here"])


@pytest.mark.slow
def test_the_entrypoint_builds_the_triplets_and_prints_a_result_the_flow_can_read(tmp_path, capsys):
    """What a cluster's Ray job runs, here with the in-process executor and the tiny preset."""
    from tasks.sample_images import write_sample_folder
    from tasks.triplets import cluster_entry

    write_sample_folder(str(tmp_path / "src"))
    params = BuildTripletsParams(source=str(tmp_path / "src"), out=str(tmp_path / "out"), size=64, shard_size=2,
                                 limit=3, inpaint_steps=2)
    body = json.loads(shlex.split(cluster_job_spec(params, "run-7").entrypoint)[3])
    body["ingest"]["executor"] = body["triplets"]["executor"] = "local"  # no Ray in this test
    assert cluster_entry.main(["cluster_entry", json.dumps(body)]) == 0
    result = parse_result(capsys.readouterr().out.splitlines())
    assert result["ingest"]["num_inputs"] == 3 and len(result["ingest"]["shard_urls"]) == 2
    trip = result["triplets"]
    assert trip["num_sources"] == 3 and trip["num_triplets"] + trip["num_rejects"] == 3
    assert json.loads((tmp_path / "out" / "triplets" / "manifest.json").read_text())["counts"]["sources"] == 3
