"""The paper's evaluation protocol as job tables: a held-out triplet set -> one generation table
per setting (CnC Table 1: depth only, exemplars only, both), conditioned on each triplet's depth
maps, exemplars and mask, prompted with its caption. The real images are the triplets' sources.

Condition files are copied once under ``<out>/conditions`` (the tables' condition root); the
tables are ``<out>/jobs-<setting>.jsonl``. Everything is streamed and written atomically, and a
rerun writes the same bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks import storage
from tasks.shards import iter_tar_samples

SETTINGS: dict[str, tuple[str, ...]] = {
    "depth": ("fg_depth", "bg_depth"),
    "exemplar": ("fg_exemplar", "bg_exemplar", "mask"),
    "both": ("fg_depth", "bg_depth", "fg_exemplar", "bg_exemplar", "mask"),
}
MEMBERS = {"fg_depth": "depth_fg.png", "bg_depth": "depth_bg.png", "fg_exemplar": "fg.png", "bg_exemplar": "bg.jpg",
           "mask": "mask.png"}


def write_protocol_tables(triplets_url: str, out_url: str, *, steps: int = 50, guidance_scale: float = 7.0,
                          seed: int = 0, limit: int | None = None,
                          settings: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, Any]:
    """Tables of the chosen settings from the triplet shards under ``triplets_url``; returns
    ``{"tables": {setting: url}, "condition_root": url, "rows": n, "skipped": m}``."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    tars = storage.list_files(triplets_url, ".tar")
    if not tars:
        raise FileNotFoundError(f"no triplet shards (.tar) under {triplets_url}")
    root = storage.join(out_url, "conditions")
    lines: dict[str, list[str]] = {name: [] for name in settings}
    rows = skipped = 0
    for tar in tars:
        for sample in iter_tar_samples(tar):
            if limit is not None and rows >= limit:
                break
            if any(m not in sample for m in MEMBERS.values()):
                skipped += 1  # not a complete triplet: nothing to condition on
                continue
            key = re.sub(r"[^A-Za-z0-9_-]", "_", sample["__key__"])[:100]
            for field, member in MEMBERS.items():
                storage.write_bytes(storage.join(root, f"{key}.{member}"), sample[member])
            caption = sample.get("txt", b"").decode("utf-8", "replace").strip() or "a photo"
            for name in settings:
                row = {"id": key, "prompt": caption, "seed": seed + rows, "steps": steps,
                       "guidance_scale": guidance_scale}
                row.update({field: f"{key}.{MEMBERS[field]}" for field in SETTINGS[name]})
                lines[name].append(json.dumps(row, sort_keys=True))
            rows += 1
    tables = {}
    for name in settings:
        tables[name] = storage.join(out_url, f"jobs-{name}.jsonl")
        storage.write_bytes(tables[name], ("\n".join(lines[name]) + "\n").encode())
    return {"tables": tables, "condition_root": root, "rows": rows, "skipped": skipped}
