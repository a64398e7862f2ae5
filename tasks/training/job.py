"""Driver of one CnC training stage (and of the three-stage chain): check, train on Ray Train, export.

``run_training(cfg)`` checks everything that can be checked before a worker starts (arguments,
the start model, the shards' fields for the stage, the output), launches a ``TorchTrainer`` (or
the same loop in this process with ``executor="local"``), then exports the last checkpoint as a
``CnCPipeline`` folder with ``train_report.json`` (written last: a stage is done exactly when it
exists) and ``loss_curve.png``. A re-run of a finished stage returns its report; a re-run of a
crashed one continues from its last checkpoint (Ray Train restores the run of the same name and
storage path).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tasks import storage
from tasks.training import data
from tasks.training.checkpoint import CheckpointStore, load_fusers, read_state
from tasks.training.config import TrainConfig
from tasks.training.loop import total_steps
from tasks.training.models import check_init, export_pipeline, start_pipeline
from tasks.training.report import write_report

CHECKPOINTS = "checkpoints"
STAGE_ORDER = ("local", "global", "full")


class TrainingConflict(ValueError):
    """The output holds another run, or ``--resume`` found nothing to continue."""


@dataclass
class TrainResult:
    stage: str
    out_url: str
    model_url: str
    report_url: str
    loss_curve_url: str
    checkpoints_url: str
    steps: int
    final_loss: float | None
    final_val_loss: float | None
    seconds: float
    skipped: bool = False
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        how = "already trained" if self.skipped else f"{self.seconds:.1f} s"
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        return f"stage {self.stage}: {self.steps} steps, final loss {loss} ({how}) -> {self.model_url}"


def _result(cfg: TrainConfig, report: dict[str, Any], skipped: bool) -> TrainResult:
    return TrainResult(cfg.stage, cfg.out, storage.join(cfg.out, "model"), storage.join(cfg.out, "train_report.json"),
                       storage.join(cfg.out, "loss_curve.png"), storage.join(cfg.out, CHECKPOINTS), report["steps"],
                       report["final_loss"], report["final_val_loss"], report["seconds"], skipped, report)


def check_training(cfg: TrainConfig) -> data.DataPlan:
    """Every check that needs no worker: config, start model, shards and their fields, output."""
    cfg.validate()
    check_init(cfg.init)
    if cfg.init_weights and not storage.exists(cfg.init_weights):
        raise FileNotFoundError(f"--init-weights {cfg.init_weights} does not exist")
    plan = data.plan_data(cfg.data.url, cfg.stage, cfg.data.val_fraction, cfg.scaling.workers)
    storage.check_writable(cfg.out)
    return plan


def _claim(cfg: TrainConfig, resume: bool) -> bool:
    """Record the run's identity in ``<out>/_config.json``; True when a run is there to continue."""
    claim_url = storage.join(cfg.out, "_config.json")
    if storage.exists(claim_url):
        claimed = storage.read_json(claim_url)
        if claimed.get("identity") != cfg.identity():
            raise TrainingConflict(f"{cfg.out} holds a {claimed.get('stage')} run with another configuration; "
                                   "use another --out")
        return True
    if resume:
        raise TrainingConflict(f"--resume: {cfg.out} holds no run to continue")
    storage.write_json(claim_url, {"identity": cfg.identity(), "stage": cfg.stage, "config": cfg.to_dict()})
    return False


def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = False) -> TrainResult:
    """Train one stage to its exported pipeline folder (see the module docstring)."""
    plan = check_training(cfg)
    report_url = storage.join(cfg.out, "train_report.json")
    if storage.exists(report_url):
        report = storage.read_json(report_url)
        if report.get("identity") == cfg.identity() and report["steps"] >= total_steps(cfg, plan):
            return _result(cfg, report, skipped=True)
    _claim(cfg, resume)
    start = time.perf_counter()
    if cfg.scaling.executor == "local":
        directory_cm = _train_local(cfg, plan, progress)
    else:
        directory_cm = _train_ray(cfg, plan, progress)
    with directory_cm as directory:
        state = read_state(directory)
        pipe = start_pipeline(cfg)
        for name, weights in load_fusers(directory).items():
            getattr(pipe, name).load_state_dict(weights)
        export_pipeline(pipe, cfg.out)
    counts = {"url": cfg.data.url, "train_samples": plan.train_keys, "val_samples": plan.val_keys,
              "padded": plan.pad, "fields": dataclasses.asdict(plan.fields)}
    report = write_report(cfg.out, cfg.to_dict(), state, plan.manifest_hash, counts, time.perf_counter() - start)
    return _result(cfg, report, skipped=False)


def _bar(total: int, enabled: bool, stage: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=f"train {stage}", unit="step")


def _show(bar: Any, record: dict[str, Any]) -> None:
    bar.n = record["step"]
    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
    bar.refresh()


def _train_local(cfg: TrainConfig, plan: data.DataPlan, progress: bool):
    from tasks.training.loop import run_loop
    from tasks.training.sessions import LocalSession

    store = CheckpointStore(storage.join(cfg.out, CHECKPOINTS), cfg.checkpoint.keep_latest)
    with _bar(total_steps(cfg, plan), progress, cfg.stage) as bar:
        run_loop(cfg, plan, LocalSession(cfg, plan, store, on_progress=lambda r: _show(bar, r)))
    return _non_empty(store.latest())


class _non_empty:
    """Wrap a checkpoint context so that a run without any checkpoint is a clear error."""

    def __init__(self, cm: Any) -> None:
        self.cm = cm

    def __enter__(self) -> str:
        directory = self.cm.__enter__()
        if directory is None:
            raise RuntimeError("training ended without a checkpoint")
        return directory

    def __exit__(self, *exc: Any) -> Any:
        return self.cm.__exit__(*exc)


def _ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are, others via fsspec."""
    fs, path = storage.get_fs(url)
    if storage.protocol_of(fs) in ("file", "local"):
        storage.makedirs(url)
        return path, None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _train_ray(cfg: TrainConfig, plan: data.DataPlan, progress: bool):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.ray_runtime import init_ray, quiet_ray_data
    from tasks.training.loop import train_worker

    init_ray()
    quiet_ray_data()
    datasets = data.ray_datasets(plan, cfg.data.resolution, cfg.data.val_fraction, cfg.data.decode_cpus)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # with seeded local shuffles: a resumed epoch replays the same order
    board = _progress_board().remote()
    storage_path, filesystem = _ray_storage(cfg.out)
    gpus = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "plan": plan, "board": board},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_latest),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=options),
    )
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    thread.start()
    shown = None
    with _bar(total_steps(cfg, plan), progress, cfg.stage) as bar:
        while thread.is_alive():
            thread.join(0.5)
            record = ray.get(board.get.remote()) if progress else None
            if record and record != shown:
                _show(bar, record)
                shown = record
    ray.kill(board)
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise result
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    return result.checkpoint.as_directory()


def _fit(trainer: Any) -> Any:
    try:
        return trainer.fit()
    except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
        return exc


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        """Rank 0's latest step record, polled by the driver's progress bar."""

        def __init__(self) -> None:
            self.record: dict[str, Any] | None = None

        def update(self, record: dict[str, Any]) -> None:
            self.record = record

        def get(self) -> dict[str, Any] | None:
            return self.record

    return Board


def run_all(base: TrainConfig, stages: tuple[str, ...] = STAGE_ORDER, epochs: int | None = None,
            resume: bool = False, progress: bool = False) -> list[TrainResult]:
    """The three-stage chain: each stage under ``base.out``/<stage>, started from the previous one's
    model (the first from ``base.init``); ``epochs`` None gives each stage its paper epochs."""
    from tasks.training.config import STAGE_EPOCHS

    check_chain(base, stages)
    if resume and not any(_started(dataclasses.replace(base, out=storage.join(base.out, s))) for s in stages):
        raise TrainingConflict(f"--resume: {base.out} holds no run to continue")
    results: list[TrainResult] = []
    init, init_weights, uni = base.init, base.init_weights, base.from_uni_controlnet
    for stage in stages:
        cfg = dataclasses.replace(base, stage=stage, out=storage.join(base.out, stage), init=init,
                                  init_weights=init_weights, from_uni_controlnet=uni,
                                  epochs=epochs or STAGE_EPOCHS[stage])
        results.append(run_training(cfg, resume=resume and _started(cfg), progress=progress))
        init, init_weights, uni = results[-1].model_url, None, False
    return results


def check_chain(base: TrainConfig, stages: tuple[str, ...] = STAGE_ORDER) -> data.DataPlan:
    """The chain's checks before any work: config, start model, the fields every stage needs, output."""
    for stage in stages:
        dataclasses.replace(base, stage=stage).validate()
    check_init(base.init)
    if base.init_weights and not storage.exists(base.init_weights):
        raise FileNotFoundError(f"--init-weights {base.init_weights} does not exist")
    needs = "full" if len(stages) > 1 else stages[0]
    plan = data.plan_data(base.data.url, needs, base.data.val_fraction, base.scaling.workers)
    storage.check_writable(base.out)
    return plan


def _started(cfg: TrainConfig) -> bool:
    return storage.exists(storage.join(cfg.out, "_config.json"))
