"""The training loop of one worker: resume, epochs of accumulated steps, checkpoints, validation.

Every worker runs the same schedule (the data split is even), so every rank reaches each
checkpoint (Ray Train's ``report`` barrier) and each optimizer step equally often. A resume
restores weights, optimizer, schedule and RNG and skips the micro-batches of the epoch already
consumed (Ray Data has no mid-epoch data checkpoint, ray#48224).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from tasks.training import data
from tasks.training.checkpoint import Checkpointer, TrainerState
from tasks.training.config import TrainConfig
from tasks.training.models import start_pipeline
from tasks.training.step import CnCLossModule, autocast, build_optimizer, build_step


class ResumeMismatch(RuntimeError):
    """The checkpoint found belongs to a run with another configuration."""


def total_steps(cfg: TrainConfig, plan: data.DataPlan) -> int:
    """Optimizer steps of the whole stage (epochs x steps per epoch, capped by max_steps)."""
    per_epoch = -(-plan.batches_per_epoch(cfg.micro_batch) // cfg.grad_accum)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    from tasks.training.sessions import RaySession

    cfg, plan = config["cfg"], config["plan"]
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    run_loop(cfg, plan, RaySession(cfg, plan, config.get("board")))


def run_loop(cfg: TrainConfig, plan: data.DataPlan, session: Any) -> TrainerState:
    """Train ``cfg.stage`` to its last step in ``session``; returns the final trainer state."""
    device, rank = session.device, session.rank
    torch.manual_seed(cfg.seed)
    pipe = start_pipeline(cfg)
    step = build_step(cfg, pipe, device)
    module = CnCLossModule(step)
    model: torch.nn.Module = module
    if session.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = build_optimizer(cfg, step.trainable_parameters())
    names = {"local": ["local_fuser"], "global": ["global_fuser"], "full": ["local_fuser", "global_fuser"]}[cfg.stage]
    checkpointer = Checkpointer({n: getattr(pipe, n) for n in names}, optimizer, scheduler)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    torch.manual_seed(cfg.seed * 1000 + rank)  # module dropout
    state = TrainerState(identity=cfg.identity())
    with session.latest_checkpoint() as directory:
        if directory is not None:
            state = checkpointer.load(directory, rank, generator)
            if state.identity != cfg.identity():
                raise ResumeMismatch("the checkpoint belongs to a run with another configuration")

    def embed(images: list) -> torch.Tensor:
        return pipe.encode_exemplar(images, device).float()

    def save(metrics: dict[str, Any]) -> None:
        session.save(lambda d: checkpointer.save(d, state, rank, generator), state.step, metrics)

    total = total_steps(cfg, plan)
    batches = plan.batches_per_epoch(cfg.micro_batch)
    accum = cfg.grad_accum
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    last_loss = state.history[-1]["loss"] if state.history else float("nan")

    def new_group() -> dict[str, Any]:
        return {"loss": 0.0, "samples": 0, "data_s": 0.0, "t": time.perf_counter(), "cpu": time.process_time(),
                "keys": [], "pending": False}

    def apply_step(group: dict[str, Any], index: int, synced: bool) -> dict[str, Any]:
        """Clip, optimizer and schedule step, bookkeeping; ``synced`` False: all-reduce grads first
        (a group cut short when fewer batches came than planned, e.g. undecodable samples skipped)."""
        if ddp and not synced:
            for p in step.trainable_parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= session.world_size
        grad_norm = None
        if cfg.optim.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(step.trainable_parameters(), cfg.optim.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch_in_epoch = index + 1
        samples = group["samples"] * session.world_size
        state.samples += samples
        step_s = time.perf_counter() - group["t"]
        record = {"step": state.step, "epoch": state.epoch, "loss": session.mean(group["loss"]),
                  "lr": scheduler.get_last_lr()[0], "samples_per_s": samples / step_s if step_s else 0.0,
                  "step_s": step_s, "data_s": group["data_s"], "cpu_s": time.process_time() - group["cpu"],
                  "peak_mib": peak_memory_mib(device)}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if rank == 0 and (state.step % cfg.log_every == 0 or state.step == total):
            state.history.append(record)
        session.progress({**record, "total": total})
        if cfg.on_step is not None:
            cfg.on_step({"rank": rank, "step": state.step, "epoch": state.epoch, "keys": group["keys"]})
        return record

    while state.step < total and state.epoch < cfg.epochs:
        skip, epoch_done = state.batch_in_epoch, True
        group = new_group()
        iterator = iter(session.train_batches(state.epoch))
        index = -1
        while True:
            t_data = time.perf_counter()
            batch_np = next(iterator, None)
            group["data_s"] += time.perf_counter() - t_data
            if batch_np is None:
                if group["pending"]:
                    last_loss = apply_step(group, index, synced=False)["loss"]
                break
            index += 1
            if index < skip:
                continue
            first = (index // accum) * accum
            size = min(accum, batches - first)
            last = index - first >= size - 1
            batch = data.to_cnc_batch(batch_np, device, embed)
            with model.no_sync() if ddp and not last else contextlib.nullcontext():
                with autocast(cfg, device):
                    loss = model(batch, generator) / size
                loss.backward()
            group["loss"] += float(loss.detach())
            group["samples"] += len(batch_np["key"])
            group["keys"] += [str(k) for k in batch_np["key"]]
            group["pending"] = True
            if not last:
                continue
            last_loss = apply_step(group, index, synced=True)["loss"]
            group = new_group()
            if state.step >= total and index + 1 < batches:
                epoch_done = False
                break
            if state.step % cfg.checkpoint.every_n_steps == 0 and index + 1 < batches:
                save({"step": state.step, "epoch": state.epoch, "loss": last_loss})
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        metrics = {"step": state.step, "epoch": state.epoch, "loss": last_loss}
        if rank == 0 and plan.val_keys:
            metrics["val_loss"] = validate(module, session, device, cfg, embed)
            if state.history:
                state.history[-1]["val_loss"] = metrics["val_loss"]
        save(metrics)
    return state


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def validate(module: CnCLossModule, session: Any, device: torch.device, cfg: TrainConfig, embed: Any) -> float:
    """Mean loss over the validation split: fixed noise, no dropout (comparable across epochs)."""
    from cnc_model.cnc.training import DropoutConfig

    step = module.step
    generator = torch.Generator().manual_seed(cfg.seed + 12345)
    cpu_rng, dropout = torch.get_rng_state(), step.dropout
    step.dropout = DropoutConfig(0.0, 0.0)
    for m in module.trainable:
        m.eval()
    total, count = 0.0, 0
    try:
        for batch_np in session.val_batches():
            n = len(batch_np["key"])
            with autocast(cfg, device):
                total += float(module(data.to_cnc_batch(batch_np, device, embed), generator)) * n
            count += n
    finally:
        for m in module.trainable:
            m.train()
        step.dropout = dropout
        torch.set_rng_state(cpu_rng)
    return total / count if count else float("nan")
