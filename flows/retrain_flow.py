"""Prefect flow ``retrain-cnc``: keep the champion current, promote only a better model.

1. Compare the triplet data with the champion's (the registry records its data manifest hash);
   nothing new: stop and say so (``force`` retrains anyway).
2. Fine-tune from the champion with the ``train-cnc`` flow (the ``full`` stage, or all three);
   without a champion, from ``init`` (bootstrapping).
3. Score candidate and champion on one frozen evaluation set (``tasks.retraining.eval_set``) with
   the ``generate-batch`` and ``evaluate-cnc`` flows; a champion's scores are cached by version.
4. Register the candidate (always: a version is history) and promote it only when it beats the
   champion by ``margin`` on ``metric`` (``tasks.registry.decide_promotion``); no champion yet:
   promote. A comparison table and the decision's reason are artifacts either way.

Every step is idempotent: a rerun finds the candidate's folder (training continues or is
skipped), the generated shards and statistics, the scores and the registered version.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.retrain_params import RetrainParams
from tasks import storage
from tasks.redact import redact_text, redact_url


@task(name="compare-data")
def compare_data(params: RetrainParams) -> Any:
    """The triplet data against the champion's: newer or not, and which shards are new."""
    from tasks.registry import Registry
    from tasks.retraining import data_state, resolve_triplets

    registry = Registry(params.registry)
    champion = registry.champion()
    url = resolve_triplets(params.data)
    if champion is None:
        return data_state(url)
    return data_state(url, champion.data_manifest_hash, registry.report(champion.version, "data_manifest"))


@task(name="prepare-eval-set")
def prepare_eval_set(eval_set: Any) -> dict[str, Any]:
    """The frozen set's protocol tables (written once, read back on every later run)."""
    return eval_set.prepare()


def frozen_eval_set(params: RetrainParams) -> Any:
    from tasks.retraining import FrozenEvalSet

    return FrozenEvalSet(triplets=params.eval_triplets, work=params.work, settings=tuple(params.eval_settings),
                         rows=params.eval_rows, steps=params.eval_steps, guidance_scale=params.eval_guidance,
                         seed=params.eval_seed, preset=params.preset, inception_weights=params.inception_weights,
                         clip=params.clip, splits=params.splits)


def score_model(params: RetrainParams, eval_set: Any, protocol: dict[str, Any], model_url: str, key: str
                ) -> dict[str, float]:
    """A model's flattened metrics on the frozen set: cached by ``key``, else the generate-batch
    flow per setting and the evaluate-cnc flow (with the set's reference statistics)."""
    from flows.evaluate_flow import evaluate_cnc
    from flows.generate_flow import generate_batch
    from flows.generation_params import EvaluateParams, GenerateBatchParams
    from tasks.retraining import flatten_metrics
    from tasks.retraining.model_cache import local_model

    cached = eval_set.cached_scores(key)
    if cached is not None:
        get_run_logger().info("retrain-cnc: %s scored before on eval set %s", key, eval_set.id)
        return cached
    model = local_model(model_url, key)
    root = eval_set.model_root(key)
    generated = {}
    for setting, table in protocol["tables"].items():
        out = storage.join(root, "generated", setting)
        generate_batch(GenerateBatchParams(rows=table, out=out, model=model, condition_root=protocol["condition_root"],
                                           batch_size=params.generate_batch_size, actors=params.actors,
                                           gpus_per_actor=params.gpus_per_actor, device=params.device,
                                           executor=params.generate_executor))
        generated[setting] = storage.join(out, "shards")
    out = storage.join(root, "metrics")
    eval_set.seed_reference(out)
    metrics = evaluate_cnc(EvaluateParams(real=eval_set.shards_url, settings=generated, out=out, preset=params.preset,
                                          inception_weights=params.inception_weights, clip=params.clip,
                                          actors=params.actors, gpus_per_actor=params.gpus_per_actor,
                                          device=params.device or "cpu", batch_size=params.eval_batch_size,
                                          splits=params.splits, condition_root=protocol["condition_root"],
                                          executor=params.eval_executor))
    eval_set.keep_reference(out)
    scores = flatten_metrics(metrics)
    eval_set.store_scores(key, scores)
    return scores


@task(name="register-candidate")
def register_candidate(params: RetrainParams, final: dict[str, Any], data_url: str, scores: dict[str, float],
                       eval_set_id: str, note: str) -> Any:
    """Copy the candidate into the registry once (a rerun finds the version it registered)."""
    from tasks.registry import Registry
    from tasks.retraining import find_registered

    registry = Registry(params.registry)
    found = find_registered(registry, final["model_url"])
    if found is not None:
        return found
    return registry.register(final["model_url"], {
        "train_report": final["report_url"], "data_manifest": storage.join(data_url, "manifest.json"),
        "metrics": {**scores, "eval_set": eval_set_id, "decision_metric": params.metric}}, note=note)


@task(name="move-champion")
def move_champion(params: RetrainParams, version: str, compared_with: Optional[str], reason: str) -> dict[str, Any]:
    """Promote ``version`` unless the champion changed since it was compared (then keep it)."""
    from tasks.registry import Registry

    registry = Registry(params.registry)
    current = registry.champion()
    current_version = current.version if current else None
    if current_version == version:
        return {"promoted": True, "reason": f"{version} is already the champion"}
    if current_version != compared_with:
        return {"promoted": False, "reason": f"the champion changed during this run ({compared_with} -> "
                f"{current_version}): {version} was compared with the old one and is not promoted; rerun"}
    event = registry.promote(version, reason)
    return {"promoted": True, "reason": reason, "seq": event.seq}


@flow(name="retrain-cnc", log_prints=True)
def retrain_cnc(params: RetrainParams) -> dict[str, Any]:
    """Fine-tune on newer triplets, score against the champion on a frozen set, promote only if better."""
    from flows.train_flow import TrainParams, train_cnc
    from tasks.registry import Registry, decide_promotion
    from tasks.retraining import candidate_id

    logger = get_run_logger()
    champion = Registry(params.registry).champion()
    champ_version = champion.version if champion else None
    state = compare_data(params)
    logger.info("retrain-cnc: %s", state.reason())
    if not state.newer and not params.force:
        summary = {"action": "up-to-date", "promoted": False, "champion": champ_version, "candidate": None,
                   "reason": state.reason(), "new_shards": []}
        publish(summary, [], params)
        return summary
    eval_set = frozen_eval_set(params)
    protocol = prepare_eval_set(eval_set)
    cand = candidate_id(champ_version, state.hash, params.training())
    out = storage.join(params.work, "candidates", cand)
    stages = train_cnc(TrainParams(
        stage=params.stage, data=state.url, out=out, init=champion.pipeline_url if champion else params.init,
        workers=params.workers, gpus_per_worker=params.gpus_per_worker, cpus_per_worker=params.cpus_per_worker,
        executor=params.executor, batch_size=params.batch_size, epochs=params.epochs, max_steps=params.max_steps,
        lr=params.lr, val_fraction=params.val_fraction, checkpoint_every=params.checkpoint_every,
        mixed_precision=params.mixed_precision, decode_cpus=params.decode_cpus, seed=params.seed))
    final = stages[-1]
    candidate_scores = score_model(params, eval_set, protocol, final["model_url"], f"candidate-{cand}")
    champion_scores = None
    if champion is not None:
        champion_scores = score_model(params, eval_set, protocol, champion.pipeline_url, champ_version)
    decision = decide_promotion(candidate_scores, champion_scores, params.metric, params.margin,
                                relative=params.relative, higher_is_better=params.higher_is_better)
    note = (f"retrain-cnc: {params.stage} from {champ_version or redact_url(params.init)} on data {state.hash[:12]} "
            f"({len(state.new_shards)} new shards), eval set {eval_set.id}")
    version = register_candidate(params, final, state.url, candidate_scores, eval_set.id, note)
    eval_set.store_scores(version.version, candidate_scores)  # the next run finds this champion-to-be scored
    reason = decision.reason
    promoted = False
    if decision.promote:
        moved = move_champion(params, version.version, champ_version, f"retrain-cnc on eval set {eval_set.id}: "
                              f"{decision.reason}")
        promoted, reason = moved["promoted"], moved["reason"]
    summary = {"action": "promoted" if promoted else "kept", "promoted": promoted, "candidate": version.version,
               "champion": version.version if promoted else champ_version, "previous_champion": champ_version,
               "reason": reason, "metric": params.metric, "margin": params.margin, "eval_set": eval_set.id,
               "data_hash": state.hash, "new_shards": state.new_shards, "candidate_out": out,
               "table": decision.table}
    publish(summary, decision.table, params)
    logger.info("retrain-cnc: %s", redact_text(reason))
    return summary


def publish(summary: dict[str, Any], table: list[dict[str, Any]], params: RetrainParams) -> None:
    """The comparison table and the decision (with its reason) as artifacts, whatever the outcome."""
    rows = table or [{"metric": params.metric, "decides": True, "champion": None, "candidate": None,
                      "delta": None, "better": None}]
    create_table_artifact(key="retrain-cnc-comparison", table=rows,
                          description=redact_text(f"{summary['action']}: {summary['reason']}"))
    relative = ", relative" if params.relative else ""
    lines = [f"# retrain-cnc: {summary['action']}", "", redact_text(summary["reason"]), "",
             "| what | value |", "| --- | --- |",
             f"| champion now | {summary['champion']} |", f"| candidate | {summary['candidate']} |",
             f"| decision metric | {params.metric} (margin {params.margin:g}{relative}) |",
             f"| new shards | {len(summary['new_shards'])} |", f"| registry | {redact_url(params.registry)} |"]
    create_markdown_artifact(key="retrain-cnc-decision", markdown="\n".join(lines),
                             description=redact_text(summary["reason"]))
