"""Run an ingest on a simulated 3-node Ray cluster and kill a worker node mid-run.

Started by test_ray_cluster.py in its own process (a process holds one Ray connection).
Prints one JSON line with the outcome.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster


def main(src: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    from tasks.ingest import run_ingest

    seen: list[dict] = []
    killed_after: list[int] = []

    def on_shard(row: dict) -> None:
        seen.append(row)
        if not killed_after:
            cluster.remove_node(workers[0], allow_graceful=False)
            killed_after.append(len(seen))

    result = run_ingest("folder", src, out, size=128, shard_size=1, on_shard=on_shard)
    print(json.dumps({"killed_after": killed_after[0], "results": len(seen), "inputs": result.num_inputs,
                      "samples": result.num_samples, "rejects": result.num_rejects,
                      "shards": len(result.shard_urls), "alive_nodes": sum(n["Alive"] for n in ray.nodes())}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
