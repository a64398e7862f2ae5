"""Actor-pool sizing: defaults that always fit, explicit requests that win, clear errors."""

from __future__ import annotations

import pytest

from tasks.run_options import RunOptions
from tasks.triplets.job import StageOptions
from tasks.triplets.resources import (
    TASK_CPUS,
    PoolPlan,
    ResourceError,
    check_fits,
    plan_pools,
    pool_groups,
    pool_workers,
)
from tasks.triplets.stages import STAGE_CLASSES, stage_names

MODEL_FREE = {n for n, cls in STAGE_CLASSES.items() if not cls.has_model}


def pools(clip: bool = False, latents: bool = False) -> list[str]:
    return [g[-1] for g in pool_groups(stage_names(clip, latents), MODEL_FREE)]


def test_numpy_only_stages_run_in_the_inpainting_pool():
    assert MODEL_FREE == {"mask_filter", "foreground"}
    assert pool_groups(stage_names(True, True), MODEL_FREE) == [
        ["saliency"], ["mask_filter", "foreground", "inpaint"], ["depth"], ["clip"], ["latents"]]
    assert pool_groups(["a", "b", "c"], {"b", "c"}) == [["a"], ["b", "c"]]  # trailing ones: a pool of their own


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("optional", [False, True])
def test_defaults_fit_every_machine_and_give_inpainting_the_rest(cpus, optional):
    plans = plan_pools(pools(optional, optional), {}, cpus)
    check_fits(plans, cpus)
    used = sum(p.num_cpus * p.min_actors for p in plans.values()) + 2 * TASK_CPUS
    inpaint = plans["inpaint"]
    assert cpus - 0.01 * inpaint.min_actors - 1e-9 < used <= cpus + 1e-9  # nothing idle but the rounding down
    assert inpaint.min_actors == inpaint.max_actors == max(1, round(cpus * 0.8))
    assert all(p.min_actors == p.max_actors == 1 for n, p in plans.items() if n != "inpaint")
    assert all(p.torch_threads == 1 for p in plans.values())


def test_a_short_job_starts_no_idle_inpainting_actors_and_keeps_one_thread():
    short, long = plan_pools(pools(), {}, 16, batches=3)["inpaint"], plan_pools(pools(), {}, 16, batches=100)["inpaint"]
    assert (short.min_actors, long.min_actors) == (3, 13)
    assert short.num_cpus > long.num_cpus
    # threads never follow the default share: the bytes a job writes do not depend on its size
    assert short.torch_threads == long.torch_threads == 1


def test_only_max_actors_leaves_room_for_the_pool_at_its_largest():
    plan = plan_pools(pools(), {"inpaint": StageOptions(max_actors=8)}, 16)["inpaint"]
    assert (plan.min_actors, plan.max_actors, plan.torch_threads) == (1, 8, 1)
    assert 8 * plan.num_cpus <= 16 - 2 * TASK_CPUS - 0.2


def test_cpu_pools_share_the_cpus_when_inpainting_is_on_a_gpu():
    plans = plan_pools(pools(), {"inpaint": StageOptions(num_gpus=1)}, 16, total_gpus=1)
    assert plans["inpaint"] == PoolPlan(0.5, 1.0, 1, 1)
    assert plans["saliency"].min_actors == plans["depth"].min_actors == 7
    check_fits(plans, 16, 1)
    assert all(p.torch_threads == 1 for p in plans.values())


def test_a_joined_cluster_that_may_autoscale_gets_open_pools():
    plans = plan_pools(pools(), {"depth": StageOptions(num_gpus=0.5), "saliency": StageOptions(max_actors=2)},
                       total_cpus=0, total_gpus=0, elastic=True)  # a head node without CPUs, no workers yet
    assert plans["inpaint"] == PoolPlan(1.0, 0.0, 1, None)
    assert plans["depth"] == PoolPlan(0.5, 0.5, 1, None)
    assert (plans["saliency"].min_actors, plans["saliency"].max_actors) == (1, 2)
    assert plans["saliency"].num_cpus > 0  # never placed on a CPU-less head


def test_explicit_options_win():
    opts = {"inpaint": StageOptions(num_cpus=2.0, min_actors=1, max_actors=3), "depth": StageOptions(num_cpus=0.5)}
    plans = plan_pools(pools(), opts, 8)
    assert plans["inpaint"] == PoolPlan(2.0, 0.0, 1, 3, torch_threads=2)
    assert plans["depth"] == PoolPlan(0.5, 0.0, 1, 1)


def test_a_gpu_pool_grows_to_what_the_gpus_hold():
    opts = {"inpaint": StageOptions(num_gpus=1), "depth": StageOptions(num_gpus=0.25)}
    plans = plan_pools(pools(), opts, 32, total_gpus=8)
    assert plans["inpaint"] == PoolPlan(0.5, 1.0, 1, 8)
    assert plans["depth"] == PoolPlan(0.5, 0.25, 1, 32)
    check_fits(plans, 32, 8)


def test_requests_that_can_never_fit_are_an_error():
    with pytest.raises(ResourceError, match="need 4.7 CPUs, the cluster has 2"):
        check_fits(plan_pools(pools(), {"inpaint": StageOptions(num_cpus=1.0, min_actors=4)}, 2), 2)
    with pytest.raises(ResourceError, match="GPUs"):
        check_fits(plan_pools(pools(), {"inpaint": StageOptions(num_gpus=1, min_actors=2)}, 8, 1), 8, 1)
    with pytest.raises(ResourceError, match="min_actors 3 > max_actors 2"):
        plan_pools(pools(), {"depth": StageOptions(min_actors=3, max_actors=2)}, 8)


@pytest.mark.parametrize("joined", [False, True])
def test_a_plan_that_does_not_fit_fails_locally_and_warns_once_on_a_joined_cluster(monkeypatch, caplog, joined):
    from tasks import ray_runtime
    from tasks.triplets.job import TripletsConfig, _plan_ray_pools

    monkeypatch.setattr(ray_runtime, "init_ray", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray_runtime, "joined_cluster", lambda: joined)
    cfg = TripletsConfig("memory://in", "memory://out", stages={"inpaint": StageOptions(num_cpus=1.0, min_actors=4)})
    if not joined:  # a local Ray never grows: the job would wait forever
        with pytest.raises(ResourceError, match="need 4.7 CPUs"):
            _plan_ray_pools(cfg, warn=True)
        return
    with caplog.at_level("WARNING"):
        before_claim = _plan_ray_pools(cfg, warn=True)
        with_batches = _plan_ray_pools(cfg, batches=8)  # the job's second, sized plan
    assert before_claim["inpaint"].min_actors == with_batches["inpaint"].min_actors == 4
    assert [r.getMessage().count("grown to fit") for r in caplog.records] == [1]


def test_the_process_pool_has_one_worker_per_core_and_fits_the_models_in_memory():
    assert pool_workers(16, 1, "tiny", 64.0) == 16
    assert pool_workers(16, 4, "tiny", 64.0) == 4  # stages asking for 4 CPUs run 4 torch threads each
    assert pool_workers(16, 1, "sd15", 64.0) == 6  # 0.8 x 64 GiB at 8 GiB per process of sd15 models
    assert pool_workers(16, 1, "sd15", 4.0) == 1  # never fewer than one
    assert pool_workers(2, 1, "tiny", None) == 2  # memory unknown: CPUs decide


def test_auto_runs_a_small_job_here_and_a_larger_one_on_the_process_pool(monkeypatch):
    """A worker pays the model imports once: auto starts a pool only when two workers get two
    batches each, even from one shard; GPU stages go to Ray."""
    import tasks.shard_job as sj
    from tasks.shard_job import Shard, choose_executor
    from tasks.triplets.job import TripletsConfig, TripletsJob

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(sj, "_ray_running", lambda: False)
    monkeypatch.setattr(sj.os, "cpu_count", lambda: 2)
    monkeypatch.setattr("tasks.triplets.job.os.cpu_count", lambda: 2)
    job = TripletsJob(TripletsConfig("/in", "/out", stages={"inpaint": StageOptions(batch_size=8)}), {})

    def pick(*sizes: int, workers: int | None = None) -> str:
        pending = [Shard(i, [], n, "", "/out/shards") for i, n in enumerate(sizes)]
        return choose_executor("auto", job, job.parallel_units(pending, RunOptions(workers=workers)))[0]

    assert pick(24) == "local"  # 3 batches: one worker would get two
    assert pick(32) == "processes"  # 4 batches, one shard
    assert pick(8, 8, 8, 8) == "processes"
    assert pick(8, 8, 8, 8, workers=1) == "local"  # a pool of one is this process with extra steps
    assert pick(8, 8, 8, 8, workers=2) == "processes"
    gpu = TripletsJob(TripletsConfig("/in", "/out", stages={"inpaint": StageOptions(num_gpus=1)}), {})
    assert choose_executor("auto", gpu, 100)[0] == "ray" and "processes" not in gpu.executors
