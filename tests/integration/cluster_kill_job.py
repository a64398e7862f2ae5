"""Run a job on a simulated 3-node Ray cluster and kill a worker node mid-run.

Started by test_ray_cluster.py in its own process (a process holds one Ray connection).
Modes: ``ingest SRC OUT`` (kill after the first shard is reported) and ``triplets INGEST OUT``
(kill as soon as the model stages have staged their first batch). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


def start_cluster() -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, workers


def run_ingest_mode(cluster: Cluster, victim, src: str, out: str) -> dict:
    from tasks.ingest import run_ingest

    seen: list[dict] = []
    killed_after: list[int] = []

    def on_shard(row: dict) -> None:
        seen.append(row)
        if not killed_after:
            cluster.remove_node(victim, allow_graceful=False)
            killed_after.append(len(seen))

    result = run_ingest("folder", src, out, size=128, shard_size=1, on_shard=on_shard)
    return {"killed_after": killed_after[0], "results": len(seen), "inputs": result.num_inputs,
            "samples": result.num_samples, "rejects": result.num_rejects, "shards": len(result.shard_urls)}


def run_triplets_mode(cluster: Cluster, victim, ingest: str, out: str) -> dict:
    from tasks.triplets.job import StageOptions, run_triplets

    killed = threading.Event()

    def kill_when_staging_starts() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if list(Path(out).glob("_staging/*/part-*.parquet")):
                cluster.remove_node(victim, allow_graceful=False)
                killed.set()
                return
            time.sleep(0.05)

    threading.Thread(target=kill_when_staging_starts, daemon=True).start()
    # small CPU requests so that every stage's actor fits on the one node that is left
    stages = {n: StageOptions(batch_size=2, num_cpus=0.15, max_actors=1, cfg={"num_inference_steps": 2} if n == "inpaint" else {})
              for n in ("saliency", "inpaint", "depth")}
    result = run_triplets(ingest, out, preset="tiny", stages=stages)
    return {"killed": killed.is_set(), "sources": result.num_sources, "triplets": result.num_triplets,
            "rejects": result.num_rejects, "shards": len(result.shard_urls)}


def alive_nodes_once_settled(expected: int, deadline_s: float = 60.0) -> int:
    """The count of alive nodes, once the GCS has seen the kill (a job can finish before that)."""
    deadline = time.time() + deadline_s
    while True:
        alive = sum(n["Alive"] for n in ray.nodes())
        if alive <= expected or time.time() > deadline:
            return alive
        time.sleep(0.2)


def main(mode: str, src: str, out: str) -> None:
    cluster, workers = start_cluster()
    report = (run_ingest_mode if mode == "ingest" else run_triplets_mode)(cluster, workers[0], src, out)
    report["alive_nodes"] = alive_nodes_once_settled(expected=2)
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
