"""Where the training loop runs: a Ray Train worker, or this process (the same loop, no Ray).

A session gives the loop its rank, device, data batches per epoch, the latest checkpoint, a way
to save one, and a mean over workers. :class:`RaySession` maps these onto Ray Train V2
(``get_dataset_shard``, ``get_checkpoint``, ``report`` as the barrier every rank reaches equally
often); :class:`LocalSession` onto a :class:`~tasks.training.checkpoint.CheckpointStore`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tasks.training import data
from tasks.training.checkpoint import CheckpointStore, checkpoint_name
from tasks.training.config import TrainConfig


class LocalSession:
    """One in-process worker; checkpoints in a :class:`CheckpointStore`."""

    rank, world_size = 0, 1

    def __init__(self, cfg: TrainConfig, plan: data.DataPlan, store: CheckpointStore,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.plan, self.store, self.on_progress = cfg, plan, store, on_progress
        self.device = torch.device("cuda" if cfg.scaling.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        return self.store.latest()

    def save(self, write: Callable[[str], None], step: int, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="cnc-ckpt-") as tmp:
            write(tmp)
            self.store.publish(tmp, step)

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        rows = data.local_rows(self.plan, self.cfg.data.resolution, self.cfg.data.val_fraction, "train")
        buffer = max(self.cfg.data.shuffle_buffer, 1)
        return data.batched(data.shuffled(rows, buffer, self.cfg.seed * 7919 + epoch), self.cfg.micro_batch)

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        rows = data.local_rows(self.plan, self.cfg.data.resolution, self.cfg.data.val_fraction, "val")
        return data.batched(rows, self.cfg.micro_batch)

    def mean(self, value: float) -> float:
        return value

    def progress(self, record: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress(record)


class RaySession:
    """A Ray Train worker: dataset shards, Ray-persisted checkpoints, gloo/NCCL all-reduce."""

    def __init__(self, cfg: TrainConfig, plan: data.DataPlan, board: Any = None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg, self.plan, self.board = cfg, plan, board
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._gauges = _gauges(cfg.stage)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def save(self, write: Callable[[str], None], step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="cnc-ckpt-") as tmp:
            write(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(step))

    def train_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        buffer = max(self.cfg.data.shuffle_buffer, self.cfg.micro_batch)
        return shard.iter_batches(batch_size=self.cfg.micro_batch, batch_format="numpy", drop_last=False,
                                  local_shuffle_buffer_size=buffer, local_shuffle_seed=self.cfg.seed * 7919 + epoch,
                                  prefetch_batches=self.cfg.data.prefetch_batches)

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        import ray.train

        shard = ray.train.get_dataset_shard("val")
        if shard is None:
            return iter(())
        return shard.iter_batches(batch_size=self.cfg.micro_batch, batch_format="numpy")

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def progress(self, record: dict[str, Any]) -> None:
        for name, gauge in self._gauges.items():
            if name in record:
                gauge.set(float(record[name]), tags={"rank": str(self.rank)})
        if self.rank == 0 and self.board is not None:
            self.board.update.remote(record)


def _gauges(stage: str) -> dict[str, Any]:
    """Ray metrics (Prometheus, shown on the Ray dashboard's metrics view)."""
    from ray.util.metrics import Gauge

    tags = {"stage": stage}
    gauges = {"loss": Gauge("cnc_train_loss", "training loss (mean over workers)", tag_keys=("stage", "rank")),
              "samples_per_s": Gauge("cnc_train_samples_per_s", "samples per second, all workers",
                                     tag_keys=("stage", "rank")),
              "step_s": Gauge("cnc_train_step_seconds", "seconds per optimizer step", tag_keys=("stage", "rank"))}
    for g in gauges.values():
        g.set_default_tags(tags)
    return gauges
