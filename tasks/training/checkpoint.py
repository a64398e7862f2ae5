"""The checkpointer: one component that saves and restores everything a stage needs to continue.

A checkpoint is a folder: the trained fusers as safetensors (``local_fuser.safetensors``,
``global_fuser.safetensors``), ``optimizer.pt`` (optimizer + LR scheduler state, tensors only:
loaded with ``weights_only=True``), ``trainer_state.json`` (step, data position, loss history,
run identity) and ``rng-<rank>.pt`` per worker (noise / dropout generators). Under Ray Train the
folder is reported with ``ray.train.report`` and Ray persists it to the run's storage (any fsspec
URL, S3 included; retention by ``CheckpointConfig.num_to_keep``); the in-process executor keeps
them under ``<out>/checkpoints/checkpoint-<step>/`` with the same retention, each published by a
``_COMPLETE`` marker written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasks import storage

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainerState:
    """Where training stands: optimizer steps, the data position and the loss history."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of ``epoch`` already consumed (a resume skips them)."""
    samples: int = 0
    identity: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


def fuser_file(name: str) -> str:
    return f"{name}.safetensors"


class Checkpointer:
    """Save / load the trainable fusers, optimizer, scheduler, trainer state and RNG to a folder."""

    def __init__(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None) -> None:
        self.modules, self.optimizer, self.scheduler = modules, optimizer, scheduler

    def save(self, directory: str, state: TrainerState, rank: int, generator: torch.Generator) -> None:
        """Rank 0 writes weights, optimizer and state; every rank writes its RNG file."""
        os.makedirs(directory, exist_ok=True)
        if rank == 0:
            for name, module in self.modules.items():
                tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
                save_file(tensors, os.path.join(directory, fuser_file(name)))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(directory, OPTIMIZER_FILE))
            with open(os.path.join(directory, STATE_FILE), "w") as fh:
                json.dump(asdict(state), fh)
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(directory, f"rng-{rank}.pt"))

    def load(self, directory: str, rank: int, generator: torch.Generator) -> TrainerState:
        """Restore in place; returns the trainer state. A missing RNG file (the worker count
        changed) leaves the generator as seeded."""
        for name, module in self.modules.items():
            weights = load_file(os.path.join(directory, fuser_file(name)))
            module.load_state_dict({k: v.to(module.dtype) for k, v in weights.items()})
        opt = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        rng_path = os.path.join(directory, f"rng-{rank}.pt")
        if os.path.exists(rng_path):
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return read_state(directory)


def read_state(directory: str) -> TrainerState:
    with open(os.path.join(directory, STATE_FILE)) as fh:
        return TrainerState(**json.load(fh))


def load_fusers(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """The fuser state dicts a checkpoint holds, by component name."""
    out = {}
    for name in ("local_fuser", "global_fuser"):
        path = os.path.join(directory, fuser_file(name))
        if os.path.exists(path):
            out[name] = load_file(path)
    return out


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


class CheckpointStore:
    """Checkpoint folders under an fsspec URL for the in-process executor (Ray Train keeps its own)."""

    MARKER = "_COMPLETE"

    def __init__(self, url: str, keep_latest: int) -> None:
        self.url, self.keep_latest = url, keep_latest

    def steps(self) -> list[int]:
        fs, path = storage.get_fs(self.url)
        if not fs.exists(path):
            return []
        done = []
        for p in fs.ls(path, detail=False):
            name = posixpath.basename(p.rstrip("/"))
            if name.startswith("checkpoint-") and fs.exists(posixpath.join(p, self.MARKER)):
                done.append(int(name.split("-")[1]))
        return sorted(done)

    def publish(self, directory: str, step: int) -> str:
        """Upload ``directory`` as checkpoint ``step``, marker last; prune to ``keep_latest``."""
        target = storage.join(self.url, checkpoint_name(step))
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as fh:
                storage.write_bytes(storage.join(target, name), fh.read())
        storage.write_bytes(storage.join(target, self.MARKER), b"")
        fs, _ = storage.get_fs(self.url)
        for old in self.steps()[: -self.keep_latest]:
            fs.rm(storage.get_fs(storage.join(self.url, checkpoint_name(old)))[1], recursive=True)
        return target

    @contextlib.contextmanager
    def latest(self) -> Iterator[str | None]:
        """A local copy of the newest complete checkpoint, or None."""
        steps = self.steps()
        if not steps:
            yield None
            return
        source = storage.join(self.url, checkpoint_name(steps[-1]))
        with tempfile.TemporaryDirectory(prefix="cnc-ckpt-") as tmp:
            for url in storage.list_files(source):
                name = posixpath.basename(storage.get_fs(url)[1])
                with open(os.path.join(tmp, name), "wb") as fh:
                    fh.write(storage.read_bytes(url))
            yield tmp
