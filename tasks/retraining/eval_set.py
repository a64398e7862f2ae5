"""The frozen evaluation set: the same rows, seeds and reference statistics for every model compared.

A frozen set is named by a hash of what decides its numbers (the held-out triplets and their
shards' sizes, the rows, sampler steps, guidance, seed, settings, feature nets, splits) and lives
under ``<work>/eval-sets/<id>/``:

    eval_set.json          the identity
    jobs-<setting>.jsonl   the protocol tables (tasks/evaluation/protocol.py), conditions/ beside
    protocol.json          written last: the tables are complete
    reference/stats/real/  the real images' statistics, measured once and reused by every model
    models/<key>/          one model's generated sets and evaluation (key: a version or candidate id)
    scores/<key>.json      one model's flattened metrics: the cache (a champion is scored once)

Changing any of those inputs names another set, so two models are only ever compared on one set.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from dataclasses import asdict, dataclass
from typing import Any

from tasks import storage
from tasks.evaluation.fidelity import KEYS as FIDELITY_KEYS
from tasks.evaluation.protocol import SETTINGS, write_protocol_tables
from tasks.redact import redact_url

METRIC_NAMES = ("fid", "inception_score", "inception_score_std", "clip_score", "images", "unreadable",
                *FIDELITY_KEYS)
"""Per-setting metrics of an evaluation; a decision metric is ``<setting>.<name>``."""
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,120}$")


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"both.fid": 21.3, ...}`` from an evaluation's ``metrics.json`` (finite numbers only)."""
    flat = {}
    for setting, values in metrics["settings"].items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"{setting}.{name}"] = float(value)
    return flat


def check_metric(metric: str, settings: tuple[str, ...]) -> None:
    """ValueError (one line) unless ``metric`` is ``<setting>.<name>`` of an evaluated setting."""
    setting, _, name = metric.partition(".")
    if setting not in settings or name not in METRIC_NAMES:
        raise ValueError(f"metric {metric!r} must be <setting>.<name> with setting in {', '.join(settings)} "
                         f"and name in {', '.join(METRIC_NAMES)}")


@dataclass(frozen=True)
class FrozenEvalSet:
    """A held-out triplet set turned into fixed generation rows, scored the same way for every model."""

    triplets: str
    work: str
    settings: tuple[str, ...] = tuple(SETTINGS)
    rows: int | None = None
    steps: int = 50
    guidance_scale: float = 7.0
    seed: int = 0
    preset: str = "sd15"
    inception_weights: str | None = None
    clip: str | None = None
    splits: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown or not self.settings:
            raise ValueError(f"settings must be some of {', '.join(SETTINGS)}, got {list(self.settings)}")

    @property
    def shards_url(self) -> str:
        nested = storage.join(self.triplets, "shards")
        return nested if storage.list_files(nested, ".tar") else self.triplets

    def identity(self) -> dict[str, Any]:
        """What decides the numbers; the held-out shards by name and size (credentials never kept)."""
        fs, _ = storage.get_fs(self.shards_url)
        shards = {posixpath.basename(url): fs.size(storage.get_fs(url)[1])
                  for url in storage.list_files(self.shards_url, ".tar")}
        if not shards:
            raise FileNotFoundError(f"no held-out triplet shards (.tar) under {redact_url(self.triplets)}")
        fields = {k: v for k, v in asdict(self).items() if k not in ("work", "triplets")}
        return {"triplets": redact_url(self.triplets), "shards": shards, **fields, "settings": list(self.settings)}

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def root(self) -> str:
        return storage.join(self.work, "eval-sets", self.id)

    def prepare(self) -> dict[str, Any]:
        """The protocol tables (written once; a rerun reads them back): tables, condition root, rows."""
        done = storage.join(self.root, "protocol.json")
        if storage.exists(done):
            return storage.read_json(done)
        storage.write_json(storage.join(self.root, "eval_set.json"), self.identity())
        protocol = write_protocol_tables(self.shards_url, self.root, steps=self.steps,
                                         guidance_scale=self.guidance_scale, seed=self.seed, limit=self.rows,
                                         settings=self.settings)
        if protocol["rows"] < 2:
            raise ValueError(f"the held-out set {redact_url(self.triplets)} gives {protocol['rows']} complete "
                             "triplets; FID needs at least 2")
        storage.write_json(done, protocol)
        return protocol

    # ---- per-model outputs and the score cache -------------------------------------------------
    def model_root(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise ValueError(f"model key {key!r} must be letters, digits, '-' or '_'")
        return storage.join(self.root, "models", key)

    def cached_scores(self, key: str) -> dict[str, float] | None:
        url = storage.join(self.root, "scores", f"{key}.json")
        return storage.read_json(url) if storage.exists(url) else None

    def store_scores(self, key: str, scores: dict[str, float]) -> None:
        self.model_root(key)  # validates the key
        storage.write_json(storage.join(self.root, "scores", f"{key}.json"), scores)

    # ---- reference statistics: measured once, copied into each model's evaluation ---------------
    def _reference(self) -> str:
        return storage.join(self.root, "reference", "stats", "real")

    def seed_reference(self, evaluation_out: str) -> int:
        """Copy the real images' statistics into an evaluation output before it runs; returns how
        many files were copied (0 before the first evaluation of this set)."""
        return _copy_missing(self._reference(), storage.join(evaluation_out, "stats", "real"))

    def keep_reference(self, evaluation_out: str) -> int:
        """After an evaluation: keep its real statistics as the set's reference (once)."""
        if storage.list_files(self._reference(), ".npz"):
            return 0
        return _copy_missing(storage.join(evaluation_out, "stats", "real"), self._reference())


def _copy_missing(src: str, dst: str) -> int:
    copied = 0
    for url in storage.list_files(src, ".npz"):
        target = storage.join(dst, posixpath.basename(url))
        if not storage.exists(target):
            fs, path = storage.get_fs(url)
            with fs.open(path, "rb") as src_fh, storage.atomic_open(target, "wb") as dst_fh:
                while chunk := src_fh.read(8 << 20):  # FID sums are 32 MiB per shard with Inception
                    dst_fh.write(chunk)
            copied += 1
    return copied
