"""``make demo``: the main job end to end on bundled photos, on the embedded defaults.

Local Ray, Prefect's local server on SQLite (ephemeral unless PREFECT_API_URL is set), a local
folder as storage and the tiny model preset: the build-triplets flow, ingest to contact sheet.
"""

from __future__ import annotations

import os
from typing import Any

from tasks import storage
from tasks.sample_images import write_sample_folder


def run_demo(out: str) -> dict[str, Any]:
    # The first start of the ephemeral server migrates a new SQLite database: give it time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.params import BuildTripletsParams
    from flows.triplets_flow import build_triplets

    out = os.path.abspath(out) if "://" not in out else out
    sources = storage.join(out, "sources")
    write_sample_folder(sources)
    params = BuildTripletsParams(source_format="folder", source=sources, out=out, preset="tiny", size=128,
                                 shard_size=4)
    result = build_triplets(params)
    ingest, triplets = result["ingest"], result["triplets"]
    print()
    print(f"demo: {ingest['num_inputs']} photos -> {ingest['num_samples']} ingested -> "
          f"{triplets['num_triplets']} triplets, {triplets['num_rejects']} rejects "
          f"in {len(triplets['shard_urls'])} shards")
    print(f"demo: triplet shards, index, manifest: {storage.join(out, 'triplets')}")
    if triplets["preview_url"]:
        print(f"demo: contact sheet: {triplets['preview_url']}")
    return result
