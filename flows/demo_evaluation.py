"""The end of ``make demo``: the paper's evaluation protocol, small, on the demo's triplets.

Job tables for the three settings (depth, exemplars, both) from the triplet shards, the
generate-batch flow for each, then the evaluate-cnc flow against the triplets' source images.
Generation runs in-process (three small jobs; an actor
pool's start-up would cost more than the images), the evaluation on a Ray actor pool. The model is
the tiny pipeline and the feature nets are the tiny preset's: the numbers test the
plumbing; they are not FID, Inception Score or CLIPScore.
"""

from __future__ import annotations

from typing import Any

from tasks import storage

DEMO_STEPS = 4


def run_demo_evaluation(out: str, model: str = "tiny") -> dict[str, Any]:
    from flows.evaluate_flow import evaluate_cnc
    from flows.generate_flow import generate_batch
    from flows.generation_params import EvaluateParams, GenerateBatchParams
    from tasks.evaluation.protocol import write_protocol_tables

    triplets = storage.join(out, "triplets", "shards")
    eval_url = storage.join(out, "eval")
    protocol = write_protocol_tables(triplets, eval_url, steps=DEMO_STEPS)
    generated = {}
    for setting, table in protocol["tables"].items():
        gen_out = storage.join(eval_url, "generated", setting)
        generate_batch(GenerateBatchParams(rows=table, out=gen_out, model=model,
                                           condition_root=protocol["condition_root"], shard_size=8, batch_size=4,
                                           executor="local"))  # in-process: no actor start-up per setting
        generated[setting] = storage.join(gen_out, "shards")
    metrics = evaluate_cnc(EvaluateParams(real=triplets, settings=generated, out=storage.join(eval_url, "metrics"),
                                          preset="tiny", splits=2, batch_size=8,
                                          condition_root=protocol["condition_root"]))
    print()
    print(f"demo: evaluation of {protocol['rows']} held-out triplets x {len(generated)} settings "
          "(tiny model and tiny feature nets: plumbing numbers, not FID / IS / CLIPScore)")
    for name, values in metrics["settings"].items():
        print(f"demo:   {name:9s} images {values['images']:3d}  fid* {values['fid']:.4g}  "
              f"is* {values['inception_score']:.4g}  clip* {values['clip_score']:.4g}  "
              f"depth-err* fg {values['depth_fg_error']:.3g} bg {values['depth_bg_error']:.3g}  "
              f"exemplar-sim* fg {values['exemplar_fg_similarity']:.3g} bg {values['exemplar_bg_similarity']:.3g}")
    print(f"demo: metrics table: {metrics['metrics_url']}")
    print(f"demo: metrics figure: {metrics['figure_url']}")
    return metrics
