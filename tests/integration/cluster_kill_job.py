"""Run a job on a simulated 3-node Ray cluster and kill a worker node while it holds work.

Started by test_ray_cluster.py in its own process (a process holds one Ray connection).
Modes: ``ingest SRC OUT`` and ``triplets INGEST OUT``. A watcher thread kills the victim node at
the first moment it is seen doing the job's work: in ``ingest`` mode one of its worker processes
holds an uncommitted shard open (a ``.tmp-`` file in the output), in ``triplets`` mode the model
stages have staged a batch and one of its workers runs a Ray Data task or actor method. So the
kill always loses work in flight; the report says what was lost. Before reporting, the job waits
until the cluster itself has seen the node die (never a guessed sleep). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

WATCH_SECONDS = 300
DEATH_SECONDS = 120


def start_cluster() -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, workers


def node_workers(node) -> list[psutil.Process]:
    """The worker processes that the node's raylet started."""
    try:
        return psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True)
    except psutil.Error:
        return []


def open_uncommitted_shard(node, out: Path) -> str | None:
    """The name of a shard temp file that one of the node's workers is writing, if any."""
    for proc in node_workers(node):
        try:
            for f in proc.open_files():
                path = Path(f.path)
                if ".tmp-" in path.name and out in path.parents:
                    return path.name
        except psutil.Error:
            continue
    return None


def running_data_work(node) -> str | None:
    """The title of a worker of the node that runs a Ray Data task or an actor's method."""
    for proc in node_workers(node):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and ("Map" in title) and not title.startswith("ray::IDLE"):
            return title.strip()
    return None


class Killer:
    """Kills ``victim`` as soon as ``busy()`` names the work it holds."""

    def __init__(self, cluster: Cluster, victim, busy) -> None:
        self.cluster, self.victim, self.busy = cluster, victim, busy
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + WATCH_SECONDS
        while not self._stop.is_set() and time.monotonic() < deadline:
            work = self.busy()
            if work:
                self.cluster.remove_node(self.victim, allow_graceful=False)
                self.lost = work
                return
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_until_dead(node_id: str) -> int:
    """Wait until the GCS reports ``node_id`` dead; return the number of nodes still alive."""
    if not any(n["NodeID"] == node_id for n in ray.nodes()):
        raise ValueError(f"no node {node_id} in the cluster")
    deadline = time.monotonic() + DEATH_SECONDS
    while True:
        nodes = ray.nodes()
        if not any(n["NodeID"] == node_id and n["Alive"] for n in nodes):
            return sum(n["Alive"] for n in nodes)
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node_id} still alive {DEATH_SECONDS} s after it was killed")
        time.sleep(0.2)


def run_ingest_mode(cluster: Cluster, victim, src: str, out: str) -> dict:
    from tasks.ingest import run_ingest

    shards = Path(out).resolve() / "shards"
    killer = Killer(cluster, victim, lambda: open_uncommitted_shard(victim, shards))
    result = run_ingest("folder", src, out, size=128, shard_size=1)
    killer.stop()
    return {"lost": killer.lost, "inputs": result.num_inputs, "samples": result.num_samples,
            "rejects": result.num_rejects, "shards": len(result.shard_urls)}


def run_triplets_mode(cluster: Cluster, victim, ingest: str, out: str) -> dict:
    from tasks.triplets.job import StageOptions, run_triplets

    def busy() -> str | None:
        if not list(Path(out).glob("_staging/*/part-*.parquet")):
            return None
        return running_data_work(victim)

    killer = Killer(cluster, victim, busy)
    # small CPU requests so that every stage's actor fits on the one node that is left
    stages = {n: StageOptions(batch_size=2, num_cpus=0.15, max_actors=1, cfg={"num_inference_steps": 2} if n == "inpaint" else {})
              for n in ("saliency", "inpaint", "depth")}
    result = run_triplets(ingest, out, preset="tiny", stages=stages)
    killer.stop()
    return {"lost": killer.lost, "sources": result.num_sources, "triplets": result.num_triplets,
            "rejects": result.num_rejects, "shards": len(result.shard_urls)}


def main(mode: str, src: str, out: str) -> None:
    cluster, workers = start_cluster()
    victim = workers[0]
    report = (run_ingest_mode if mode == "ingest" else run_triplets_mode)(cluster, victim, src, out)
    report["alive_nodes"] = wait_until_dead(victim.node_id) if report["lost"] else None
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
