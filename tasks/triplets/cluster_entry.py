"""Entrypoint of a ``build-triplets`` Ray job submitted to a cluster (``tasks.ray_jobs``).

Runs where the Jobs API starts it (a driver on the cluster, with the cluster's Ray and storage
credentials): ingest, then the model stages, both resumable, and prints one ``CNC_RESULT {json}``
line that the submitting flow reads back from the streamed log.

    python -m tasks.triplets.cluster_entry '{"ingest": {...}, "triplets": {...}}'
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

RESULT_PREFIX = "CNC_RESULT "


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Ingest then triplets from a spec made by ``job_spec``; both results as dicts."""
    from tasks.ingest import run_ingest
    from tasks.triplets.job import StageOptions, run_triplets

    # "extend": true when the flow extends the output. A Ray job runs on the cluster it was submitted
    # to, whatever auto would pick, unless the spec names an executor.
    ing = {"executor": "ray", **spec["ingest"]}
    ingest = run_ingest(ing.pop("source_format"), ing.pop("source"), ing.pop("out"), resume=True, **ing)
    trip = {"executor": "ray", **spec["triplets"]}
    stages = {name: StageOptions(**opts) for name, opts in trip.pop("stages", {}).items()}
    result = run_triplets(ingest.out_url, trip.pop("out"), stages=stages, resume=True, **trip)
    return {"ingest": asdict(ingest), "triplets": asdict(result)}


def job_spec(ingest: dict[str, Any], triplets: dict[str, Any]) -> str:
    """The JSON argument of the entrypoint (stage options as plain dicts)."""
    return json.dumps({"ingest": ingest, "triplets": triplets}, sort_keys=True)


def parse_result(lines: list[str]) -> dict[str, Any]:
    """The result the entrypoint printed (the last ``CNC_RESULT`` line wins)."""
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ValueError("the Ray job printed no CNC_RESULT line")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(RESULT_PREFIX + json.dumps(run(json.loads(argv[1])), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
