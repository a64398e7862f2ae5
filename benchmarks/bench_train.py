"""Training throughput: one Ray Train worker vs a plain single-process torch loop, same step, same data.

    python benchmarks/bench_train.py                      # tiny preset, CPU: the ratio (target >= 0.9)
    python benchmarks/bench_train.py --device cuda        # + SD 1.5 shapes at 512 px, bf16, `full` stage

The plain loop decodes the samples once up front and runs ``CnCLossModule`` + AdamW on them: the
pure step. Both are timed by the CPU time of the process running the step (one torch thread), the
median over steady-state steps: on a machine shared with other jobs wall time measures the
neighbours; CPU time counts what the step (and, in the worker, the data iterator's threads) costs. The Ray Train run reads the same shards through Ray Data inside the worker, as
``cnc train`` does. Printed: samples/s of both and their ratio, the Ray worker's peak memory and
the data loader's share of its step time (the time the loop waited for the next batch; target
< 5 %). Steady state: the first ``--warmup`` steps of each are left out. With ``--device cuda``
the SD 1.5-shaped step (random weights: no hub here) runs in bf16 autocast with fp32 fusers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """Samples/s of the bare step on pre-decoded data (the baseline)."""
    from tasks.training import data
    from tasks.training.models import start_pipeline
    from tasks.training.step import CnCLossModule, autocast, build_optimizer, build_step

    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    pipe = start_pipeline(cfg)
    step = build_step(cfg, pipe, device)
    module = CnCLossModule(step)
    optimizer, _ = build_optimizer(cfg, step.trainable_parameters())
    plan = data.plan_data(cfg.data.url, cfg.stage, 0.0, 1)
    rows = list(data.local_rows(plan, None, 0.0, "train"))
    batches = [data.to_cnc_batch(b, device, lambda ims: pipe.encode_exemplar(ims, device).float())
               for b in data.batched(rows, cfg.micro_batch)]
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + warmup):
        batch = batches[i % len(batches)]
        t = time.process_time()
        with autocast(cfg, device):
            loss = module(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.process_time() - t)
    return cfg.micro_batch / statistics.median(times)


def ray_worker(cfg, warmup: int) -> dict[str, float]:
    from tasks.training.job import run_training

    report = run_training(cfg).report
    steady = report["history"][warmup:]
    step_s = [r["step_s"] for r in steady]
    return {"samples_per_s": cfg.batch_size / statistics.median(r["cpu_s"] for r in steady),
            "loader_share": sum(r["data_s"] for r in steady) / sum(step_s),
            "peak_mib": max(r["peak_mib"] for r in report["history"])}


def sd15_step(batch: int, steps: int, warmup: int, stage: str, checkpointing: bool, smoke: bool = False
              ) -> dict[str, float]:
    """Samples/s of the SD 1.5-shaped CnC step at 512 px on CUDA (bf16 autocast, fp32 fusers).
    ``smoke``: the same code on the CPU with the tiny UNet at 64 px (checks the path, no figure)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from cnc_model.cnc.global_fuser import GlobalFuser
    from cnc_model.cnc.local_fuser import LocalFuser
    from cnc_model.cnc.training import CnCBatch, CnCTrainingStep, DropoutConfig
    from cnc_model.tiny import sd15_ddim_scheduler

    from cnc_model.tiny import tiny_unet_config

    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        unet, side, ctx = UNet2DConditionModel(**tiny_unet_config()), 64, 32
    else:  # SD 1.5 shapes
        unet, side, ctx = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64), 512, 768
    local = LocalFuser.from_unet(unet).to(device)
    glob = GlobalFuser(ctx, ctx).to(device)
    unet.to(device, torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        local.enable_gradient_checkpointing()
    step = CnCTrainingStep(unet, None, None, None, DDPMScheduler.from_config(sd15_ddim_scheduler().config),
                           local, glob, stage=stage, dropout=DropoutConfig(text=0.0))  # no tokenizer here
    params = step.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    mask = torch.zeros(batch, 1, side, side)
    mask[:, :, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    lat = side // 8
    data = CnCBatch(latents=torch.randn(batch, 4, lat, lat, generator=g), prompt_embeds=torch.randn(batch, 77, ctx, generator=g),
                    fg_depth=torch.rand(batch, 3, side, side, generator=g), bg_depth=torch.rand(batch, 3, side, side, generator=g),
                    fg_embeds=torch.randn(batch, ctx, generator=g), bg_embeds=torch.randn(batch, ctx, generator=g), mask=mask)
    data = CnCBatch(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in data.__dict__.items()})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step.loss(data, g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"samples_per_s": batch * steps / seconds, "peak_gib": peak,
            "trainable_m": sum(p.numel() for p in params) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stage", default="full")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the SD 1.5-shaped step too")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--gpu-steps", type=int, default=10)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--skip-ray", action="store_true", help="only the GPU measurement")
    parser.add_argument("--smoke-gpu-path", action="store_true",
                        help="run the GPU step's code on the CPU with the tiny UNet (a check, no figure)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if not args.skip_ray:
        import ray

        from tasks.training.config import DataConfig, OptimConfig, ScalingSpec, stage_config
        from tests.fixtures.triplets import write_triplet_shards

        with tempfile.TemporaryDirectory() as tmp:
            write_triplet_shards(f"{tmp}/data", args.samples, shard_size=8)
            cfg = stage_config(args.stage, out=f"{tmp}/out", epochs=args.epochs, batch_size=args.batch,
                               data=DataConfig(url=f"{tmp}/data", val_fraction=0.0, decode_cpus=0.5),
                               optim=OptimConfig(lr=1e-4), scaling=ScalingSpec(workers=1, cpus_per_worker=1))
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            plain = plain_loop(cfg, steps=args.samples // args.batch * args.epochs - args.warmup, warmup=args.warmup)
            worker = ray_worker(cfg, args.warmup)
        print(f"tiny preset, stage {args.stage}, batch {args.batch}, 64 px, CPU, one torch thread")
        print(f"plain torch loop:      {plain:8.2f} samples per CPU-second")
        print(f"Ray Train, 1 worker:   {worker['samples_per_s']:8.2f} samples per CPU-second")
        print(f"ratio (Ray / plain):   {worker['samples_per_s'] / plain:8.3f}   (target >= 0.9)")
        print(f"loader share of step:  {100 * worker['loader_share']:7.2f} %   (wall time waiting for the next batch; "
              "target < 5 %)")
        print(f"peak memory (worker):  {worker['peak_mib']:8.0f} MiB (max RSS)")
    if args.device == "cuda" or args.smoke_gpu_path:
        r = sd15_step(args.gpu_batch, args.gpu_steps, args.warmup, args.stage, args.gradient_checkpointing,
                      smoke=args.smoke_gpu_path)
        what = "smoke (tiny UNet, 64 px, CPU)" if args.smoke_gpu_path else "SD 1.5 shapes, 512 px"
        print(f"{what}, bf16 autocast, stage {args.stage}, batch {args.gpu_batch}: "
              f"{r['samples_per_s']:.2f} samples/s, peak {r['peak_gib']:.1f} GiB, {r['trainable_m']:.0f} M trainable")


if __name__ == "__main__":
    main()
