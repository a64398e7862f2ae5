"""Run generate-batch on a simulated 3-node Ray cluster and kill a worker node mid-run.

Started by test_generation_cluster.py in its own process (a process holds one Ray connection).
``TABLE OUT``: kills one worker node as soon as the first shard is committed. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster


def main(table: str, out: str) -> None:
    from tasks.generation.job import GenerationConfig, run_generation
    from tasks.shard_job import RunOptions

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    killed: list[int] = []

    def on_shard(row: dict) -> None:
        if not killed:
            cluster.remove_node(workers[0], allow_graceful=False)
            killed.append(row["shard"])

    cfg = GenerationConfig(table, out, shard_size=2, batch_size=2, actors=2, cpus_per_actor=0.5)
    result = run_generation(cfg, executor="ray", run_options=RunOptions(on_shard=on_shard))
    print("RESULT " + json.dumps({"killed": bool(killed), "rows": result.rows, "images": result.images,
                                  "rejects": result.rejects, "shards": len(result.shard_urls)}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
