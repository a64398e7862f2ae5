"""A candidate's identity: one folder per (champion, data, training settings), found again on a rerun.

A rerun of a crashed or finished retraining lands in the same folder (training continues or is
skipped), and a candidate already copied into the registry is found by where it was registered
from, so a rerun never registers it twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tasks.redact import redact_url
from tasks.registry import ModelVersion, Registry


def candidate_id(champion: str | None, data_hash: str, training: Mapping[str, Any]) -> str:
    """``<champion or 'bootstrap'>-<12 hex>``: the same inputs name the same candidate."""
    key = json.dumps({"champion": champion, "data": data_hash, "training": dict(training)}, sort_keys=True,
                     default=str)
    return f"{champion or 'bootstrap'}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def find_registered(registry: Registry, model_url: str) -> ModelVersion | None:
    """The version registered from ``model_url``, if a previous attempt got that far."""
    source = redact_url(model_url)
    for version in reversed(registry.versions()):
        if version.source == source:
            return version
    return None
