"""``make demo``: the main job end to end on bundled photos, on the embedded defaults.

Local Ray, Prefect's local server on SQLite (ephemeral unless PREFECT_API_URL is set), a local
folder as storage and the tiny model preset: the build-triplets flow, ingest to contact sheet, then
a short evaluation (generate-batch in three settings, evaluate-cnc) labelled as plumbing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.sample_images import write_sample_folder

ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint() -> str:
    """A hash of the project's code: a demo output made by other code is started over, since its
    recorded config may no longer match what this code writes (a re-run of the same code resumes)."""
    digest = hashlib.sha256()
    for package in ("cnc_model", "tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _start_over_if_stale(out: str) -> None:
    stamp_url = storage.join(out, ".demo-code")
    stamp = code_fingerprint()
    if storage.exists(stamp_url) and storage.read_bytes(stamp_url).decode() == stamp:
        return
    fs, root = storage.get_fs(out)
    stale = [p for p in ("ingest", "triplets", "eval") if fs.exists(f"{root}/{p}")]
    if stale:
        print(f"demo: {out} was made by other code; starting {' and '.join(stale)} over")
        for p in stale:
            fs.rm(f"{root}/{p}", recursive=True)
    storage.write_bytes(stamp_url, stamp.encode())


def run_demo(out: str) -> dict[str, Any]:
    # The first start of the ephemeral server migrates a new SQLite database: give it time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.params import BuildTripletsParams
    from flows.triplets_flow import build_triplets

    out = os.path.abspath(out) if "://" not in out else out
    _start_over_if_stale(out)
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
    from flows.demo_evaluation import run_demo_evaluation

    result["evaluation"] = run_demo_evaluation(out)
    return result
