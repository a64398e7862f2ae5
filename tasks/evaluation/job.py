"""The evaluation job: every shard of every image set -> partial statistics -> merged metrics.

Image sets are the real images and one generated set per setting (the paper's three: depth only,
exemplars only, both). Each shard's statistics are measured once by an actor of a Ray Data pool
(or in this process) and saved as ``stats/<set>/<shard>.npz`` before anything is merged, so a
rerun measures only the shards that have no statistics yet and one worker or a hundred give the
same numbers. The driver merges the files one at a time: no place ever holds all the features.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cnc_model.metrics import FrechetStats, InceptionScoreStats, MeanStats, frechet_distance, stats_io
from cnc_model.metrics.inception_score import DEFAULT_SPLITS
from tasks import storage
from tasks.evaluation.fidelity import KEYS as FIDELITY_KEYS

log = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")
REAL = "real"
CONFIG_FILE = "evaluation_config.json"
PAPER_TABLE1 = {
    # CnC (fine-tuned), COCO-Stuff val 5K, CnC paper Table 1
    "depth": {"fid": 22.257, "inception_score": 27.981, "clip_score": 26.870},
    "exemplar": {"fid": 17.254, "inception_score": 32.131, "clip_score": 25.940},
    "both": {"fid": 18.191, "inception_score": 29.304, "clip_score": 25.880},
}


class EvaluationConflict(ValueError):
    """The output holds statistics measured with another configuration."""


@dataclass
class EvaluationConfig:
    """What to measure and with which networks. ``feature_net`` is ``"tiny"`` (plumbing numbers,
    not FID) or the path of the FID Inception weights; ``clip`` is ``"tiny"`` or a CLIP model."""

    real: str
    settings: dict[str, str]
    out: str
    feature_net: str = "tiny"
    clip: str = "tiny"
    splits: int = DEFAULT_SPLITS
    batch_size: int = 16
    executor: str = "ray"
    actors: int = 1
    gpus_per_actor: float = 0.0
    device: str = "cpu"
    depth: str | None = None
    """Depth model for condition fidelity ("tiny", or a DPT id / folder); None: not measured."""
    condition_root: str | None = None
    """Where the generated rows' condition files are (the generation's ``--condition-root``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What decides the statistics' values (a rerun with another identity is refused)."""
        return {"real": self.real, "settings": dict(sorted(self.settings.items())), "feature_net": self.feature_net,
                "clip": self.clip, "splits": self.splits, "depth": self.depth,
                "condition_root": self.condition_root}

    @property
    def plumbing(self) -> bool:
        return self.feature_net == "tiny"

    def check(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if not self.settings:
            raise ValueError("give at least one generated setting")
        for name in self.settings:
            if name == REAL or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"setting name {name!r} must be letters, digits, '-' or '_' and not {REAL!r}")
        if self.splits < 1 or self.actors < 1 or self.batch_size < 1:
            raise ValueError("splits, actors and batch_size must be at least 1")


def _sets(cfg: EvaluationConfig) -> dict[str, str]:
    return {REAL: cfg.real, **cfg.settings}


def plan(cfg: EvaluationConfig) -> list[dict[str, Any]]:
    """Every (set, shard) to measure, with the URL of its statistics file."""
    items = []
    for name, url in _sets(cfg).items():
        tars = storage.list_files(url, ".tar") or storage.list_files(storage.join(url, "shards"), ".tar")
        if not tars:  # a job's output folder works as well as its shards/ folder
            raise FileNotFoundError(f"{name}: no .tar shards under {url}")
        for tar in tars:
            shard = tar.rsplit("/", 1)[-1][: -len(".tar")]
            items.append({"set": name, "tar_url": tar, "generated": name != REAL,
                          "stats_url": storage.join(cfg.out, "stats", name, f"{shard}.npz")})
    return items


def claim(cfg: EvaluationConfig) -> None:
    """Write the config on the first run; refuse an output measured with another one."""
    url = storage.join(cfg.out, CONFIG_FILE)
    if storage.exists(url):
        stored = storage.read_json(url)
        if stored != cfg.identity():
            changed = sorted(k for k in set(stored) | set(cfg.identity()) if stored.get(k) != cfg.identity().get(k))
            raise EvaluationConflict(f"{cfg.out} holds statistics measured with other {', '.join(changed)}; "
                                     "use a new output")
        return
    storage.write_json(url, cfg.identity())


def run_evaluation(cfg: EvaluationConfig) -> dict[str, Any]:
    """Measure what is missing, merge, write ``metrics.json``; returns the metrics."""
    cfg.check()
    start = time.monotonic()
    items = plan(cfg)
    claim(cfg)
    pending = [it for it in items if not storage.exists(it["stats_url"])]
    log.info("evaluation: %d shards, %d to measure", len(items), len(pending))
    if pending:
        if cfg.executor == "local":
            _measure_local(cfg, pending)
        else:
            _measure_ray(cfg, pending)
    metrics = reduce(cfg, items)
    metrics["seconds"] = round(time.monotonic() - start, 3)
    metrics["shards_measured"] = len(pending)
    from tasks.evaluation.report import write_report

    metrics["figure_url"] = write_report(metrics, cfg.settings, cfg.out)
    metrics["metrics_url"] = storage.join(cfg.out, "metrics.json")
    storage.write_json(metrics["metrics_url"], metrics)
    return metrics


def _measurer_kwargs(cfg: EvaluationConfig, torch_threads: int | None = None) -> dict[str, Any]:
    return {"feature_net": cfg.feature_net, "clip": cfg.clip, "device": cfg.device, "batch_size": cfg.batch_size,
            "splits": cfg.splits, "torch_threads": torch_threads, "depth": cfg.depth,
            "condition_root": cfg.condition_root}


def _measure_local(cfg: EvaluationConfig, pending: list[dict[str, Any]]) -> None:
    from tasks.evaluation.measure import ShardMeasurer

    measurer = ShardMeasurer(**_measurer_kwargs(cfg))
    for it in pending:
        measurer({"tar_url": [it["tar_url"]], "generated": [it["generated"]], "stats_url": [it["stats_url"]]})


def _measure_ray(cfg: EvaluationConfig, pending: list[dict[str, Any]]) -> None:
    import ray

    from tasks.evaluation.measure import ShardMeasurer
    from tasks.ray_runtime import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    rows = [{k: it[k] for k in ("tar_url", "generated", "stats_url")} for it in pending]
    actors = max(1, min(cfg.actors, len(rows)))
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(ShardMeasurer, fn_constructor_kwargs=_measurer_kwargs(cfg, torch_threads=1), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                        num_gpus=cfg.gpus_per_actor or None)
    for _ in ds.iter_rows():
        pass


def reduce(cfg: EvaluationConfig, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge each set's shard statistics (one file at a time) and compute the metrics."""
    merged: dict[str, dict[str, Any]] = {}
    for it in items:
        arrays = stats_io.load(storage.read_bytes(it["stats_url"]))
        part = {"fid": FrechetStats.from_state(stats_io.under("fid", arrays)),
                "clip": MeanStats.from_state(stats_io.under("clip", arrays)), "skipped": int(arrays["skipped"])}
        if it["generated"]:
            part["is"] = InceptionScoreStats.from_state(stats_io.under("is", arrays))
            for key in FIDELITY_KEYS:
                if stats_io.under(key, arrays):
                    part[key] = MeanStats.from_state(stats_io.under(key, arrays))
        into = merged.setdefault(it["set"], {})
        for k, v in part.items():
            into[k] = v if k not in into else into[k] + v
    real = merged[REAL]["fid"]
    results = {}
    for name in cfg.settings:
        m = merged[name]
        is_mean, is_std = m["is"].score() if m["is"].n else (math.nan, math.nan)
        results[name] = {
            "images": m["fid"].n,
            "unreadable": m["skipped"],
            "fid": frechet_distance(m["fid"], real) if m["fid"].n >= 2 and real.n >= 2 else math.nan,
            "inception_score": is_mean,
            "inception_score_std": is_std,
            "clip_score": m["clip"].mean(),
            **{key: m[key].mean() if key in m else math.nan for key in FIDELITY_KEYS},
        }
    return {
        "settings": results,
        "real_images": real.n,
        "real_unreadable": merged[REAL]["skipped"],
        "plumbing": cfg.plumbing,
        "note": ("tiny feature nets: plumbing numbers, not FID / IS / CLIPScore" if cfg.plumbing else
                 "FID Inception v3 (pt_inception weights, TF1 bilinear resize, no antialias)"),
        "paper_table1": PAPER_TABLE1,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
    }
