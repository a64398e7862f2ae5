"""Prefect flow ``evaluate-cnc``: one Ray Data job measures every set; artifacts show the table."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.generation_params import EvaluateParams


def evaluation_config(params: EvaluateParams) -> Any:
    """The job's config from the flow's parameters (ValueError naming a missing weights file)."""
    from cnc_model.metrics.feature_nets import INCEPTION_WEIGHTS_FILE
    from cnc_model.presets import get_preset
    from tasks.evaluation.job import EvaluationConfig

    preset = get_preset(params.preset)
    if preset.is_tiny:
        feature_net, clip = "tiny", params.clip or "tiny"
    elif params.inception_weights is None:
        raise ValueError(f"inception_weights is required with preset {params.preset}: the file "
                         f"{INCEPTION_WEIGHTS_FILE} (FID Inception v3 weights)")
    else:
        feature_net, clip = params.inception_weights, params.clip or preset.clip_image
    return EvaluationConfig(real=params.real, settings=params.settings, out=params.out, feature_net=feature_net,
                            clip=clip, splits=params.splits, batch_size=params.batch_size, executor=params.executor,
                            actors=params.actors, gpus_per_actor=params.gpus_per_actor, device=params.device,
                            condition_root=params.condition_root,
                            depth=(params.depth or preset.depth) if params.condition_root else None)


@task(name="measure-and-reduce", retries=2, retry_delay_seconds=5)
def measure_and_reduce(params: EvaluateParams) -> dict[str, Any]:
    """The Ray Data job; a retry measures only the shards without statistics."""
    from tasks.evaluation.job import run_evaluation

    return run_evaluation(evaluation_config(params))


@flow(name="evaluate-cnc", log_prints=True)
def evaluate_cnc(params: EvaluateParams) -> dict[str, Any]:
    """The paper's protocol (CnC Table 1) on generated sets: FID, Inception Score, CLIPScore."""
    from tasks.evaluation.report import metrics_table

    metrics = measure_and_reduce(params)
    label = " (tiny feature nets: plumbing, not FID)" if metrics["plumbing"] else ""
    create_table_artifact(key="evaluate-cnc-metrics", table=metrics_table(metrics),
                          description=f"settings x metrics, beside CnC Table 1{label}")
    create_markdown_artifact(key="evaluate-cnc-figure", description="bars per setting and sample images",
                             markdown=f"# Evaluation{label}\n\nmetrics: `{metrics['metrics_url']}`\n\n"
                                      f"figure: `{metrics['figure_url']}`\n")
    get_run_logger().info("evaluate-cnc: %s", {k: v["fid"] for k, v in metrics["settings"].items()})
    return metrics
