"""``make demo``: the main job end to end on bundled photos, on the embedded defaults.

Local Ray, Prefect's local server on SQLite (ephemeral unless PREFECT_API_URL is set), a local
folder as storage and the tiny model preset. Prints where the output is.
"""

from __future__ import annotations

import os

from tasks import storage
from tasks.sample_images import write_sample_folder


def run_demo(out: str) -> dict:
    from flows.ingest_flow import ingest_flow
    from flows.params import IngestParams

    out = os.path.abspath(out) if "://" not in out else out
    sources = storage.join(out, "sources")
    write_sample_folder(sources)
    params = IngestParams(source_format="folder", source=sources, out=storage.join(out, "ingest"), size=256,
                          shard_size=4)
    result = ingest_flow(params)
    print()
    print(f"demo: {result['num_inputs']} photos -> {result['num_samples']} samples, "
          f"{result['num_rejects']} rejects, {len(result['shard_urls'])} shards")
    print(f"demo: shards and manifest are in {params.out}")
    return result
