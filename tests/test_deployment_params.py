"""prefect.yaml's build-triplets deployments stay in step with the flow's parameters, the job's
StageOptions and the pool planner (the cluster one cannot run here, so its parameters are checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.params import BuildTripletsParams
from flows.triplets_flow import triplet_stage_options
from tasks.triplets.job import TripletsConfig
from tasks.triplets.resources import ResourceError, check_fits, plan_pools, pool_groups
from tasks.triplets.stages import STAGE_CLASSES

ROOT = Path(__file__).resolve().parents[1]
MODEL_FREE = {n for n, cls in STAGE_CLASSES.items() if not cls.has_model}


def deployment(entrypoint_flow: str, name: str) -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == name and d["entrypoint"].endswith(entrypoint_flow)]
    return dep


def pools_for(params: BuildTripletsParams, cpus: float, gpus: float):
    opts = triplet_stage_options(params)
    cfg = TripletsConfig("in", "out", params.preset, params.clip, params.latents, opts)
    names = [g[-1] for g in pool_groups(cfg.stage_names(), MODEL_FREE)]
    return opts, plan_pools(names, opts, cpus, gpus)


def test_the_cluster_deployment_maps_onto_gpu_pools():
    params = BuildTripletsParams(**deployment(":build_triplets", "cluster")["parameters"]["params"])
    assert (params.preset, params.clip, params.latents) == ("sd15", True, True)
    opts, plans = pools_for(params, cpus=64, gpus=8)
    assert opts["inpaint"].cfg == {"num_inference_steps": 25}
    assert opts["inpaint"].memory_gib == 4
    assert (plans["inpaint"].num_gpus, plans["inpaint"].min_actors, plans["inpaint"].max_actors) == (1, 1, 8)
    assert set(plans) == {"saliency", "inpaint", "depth", "clip", "latents"}
    check_fits(plans, 64, 8)
    with pytest.raises(ResourceError, match="GPUs"):  # no GPU at all: the pools cannot start
        check_fits(plans, 64, 0)


def test_the_local_deployment_runs_on_two_cpus():
    params = BuildTripletsParams(**deployment(":build_triplets", "local")["parameters"]["params"])
    assert params.preset == "tiny"
    opts, plans = pools_for(params, cpus=2, gpus=0)
    assert opts["inpaint"].cfg == {"num_inference_steps": params.inpaint_steps}
    check_fits(plans, 2, 0)
    assert plans["inpaint"].min_actors == 2


@pytest.mark.parametrize("flow_name, params_cls", [
    (":generate_batch", "GenerateBatchParams"), (":evaluate_cnc", "EvaluateParams"), (":glod_sweep", "GLoDSweepParams")])
@pytest.mark.parametrize("name", ["local", "cluster"])
def test_generation_and_evaluation_deployments_validate(flow_name, params_cls, name):
    import flows.generation_params as gp

    params = getattr(gp, params_cls)(**deployment(flow_name, name)["parameters"]["params"])
    if name == "cluster":
        assert getattr(params, "gpus_per_actor") > 0 and getattr(params, "device") == "cuda"
    if params_cls == "EvaluateParams":
        assert set(params.settings) == {"depth", "exemplar", "both"}  # the paper's three settings
        assert (params.preset == "tiny") == (name == "local")
        assert name == "local" or params.inception_weights
    if params_cls == "GLoDSweepParams":
        from tasks.generation.sweep import load_sweep

        sweep = load_sweep(ROOT / params.sweep)
        assert sweep.rows and not any(r.reason for r in sweep.rows)
