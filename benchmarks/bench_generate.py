"""Generation and evaluation throughput: batching vs a plain loop, our FID features vs torchmetrics.

1. Images/s of batch generation (``tasks.generation``: rows grouped by settings, ``--batch-size``
   rows per UNet call, every row with its own generator) vs a plain loop calling the diffusers
   pipeline one row at a time, on the same rows and model, in this process. Also the whole
   generate-batch job (local executor: table, shards, index, manifest) on the same rows.
2. FID feature extraction + statistics: our ``ShardMeasurer`` path (feature net + float64
   ``FrechetStats.update``) vs torchmetrics' ``FrechetInceptionDistance.update`` on the same images
   with the same feature net, one process, per core (``--threads``).

    .venv/bin/python benchmarks/bench_generate.py                       # tiny preset, CPU, 1 thread (~1 min)
    .venv/bin/python benchmarks/bench_generate.py --rows 64 --steps 10 --batch-size 16
    .venv/bin/python benchmarks/bench_generate.py --device cuda --model /path/to/cnc-sd15 --steps 50 --rows 64 \
        --batch-size 8 --inception-weights /path/to/weights-inception-2015-12-05-6726825d.pth

Nothing asserts a time; the ratios are what to read. Results go in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def rows_of(n: int, steps: int) -> list[dict]:
    prompts = ["a red cube on a table", "a blue ball in a garden", "a cat on a sofa", "a house by a lake"]
    return [{"id": f"r{i:04d}", "prompt": prompts[i % len(prompts)], "seed": i, "steps": steps} for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generation(args: argparse.Namespace) -> dict:
    from tasks.generation.generator import BatchGenerator
    from tasks.generation.rows import parse_row

    rows = [parse_row(r) for r in rows_of(args.rows, args.steps)]
    gen = BatchGenerator(args.model, device=args.device, batch_size=args.batch_size)
    pipe = gen.pipe
    warm = rows[: min(2, len(rows))]
    gen.generate(warm)
    pipe(warm[0].prompt, num_inference_steps=1, generator=torch.Generator(pipe.device).manual_seed(0))

    sync(args.device)
    t0 = time.perf_counter()
    for row in rows:  # the baseline: the diffusers pipeline, one row per call
        pipe(row.prompt, row.negative_prompt or None, num_inference_steps=row.steps, guidance_scale=row.guidance_scale,
             generator=torch.Generator(pipe.device).manual_seed(row.seed))
    sync(args.device)
    loop_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    outcomes = gen.generate(rows)
    sync(args.device)
    batched_s = time.perf_counter() - t0
    assert all(o.png for o in outcomes)

    tmp = Path(tempfile.mkdtemp(prefix="cnc-bench-generate-"))
    try:
        table = tmp / "jobs.jsonl"
        table.write_text("\n".join(json.dumps(r) for r in rows_of(args.rows, args.steps)) + "\n")
        from tasks.generation.job import GenerationConfig, run_generation

        t0 = time.perf_counter()
        result = run_generation(GenerationConfig(str(table), str(tmp / "out"), model=args.model,
                                                 shard_size=args.shard_size, batch_size=args.batch_size,
                                                 device=args.device), executor="local")
        job_s = time.perf_counter() - t0
        assert result.images == args.rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.rows
    return {"rows": n, "steps": args.steps, "batch_size": args.batch_size,
            "loop_images_per_s": n / loop_s, "batched_images_per_s": n / batched_s, "job_images_per_s": n / job_s,
            "batched_vs_loop": loop_s / batched_s, "job_vs_loop": loop_s / job_s}


def bench_features(args: argparse.Namespace) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from cnc_model.metrics import FrechetStats
    from cnc_model.metrics.feature_nets import load_feature_net

    net = load_feature_net(args.inception_weights or "tiny").to(args.device)

    class Pool(torch.nn.Module):
        num_features = net.num_features

        def forward(self, x):
            return net(x)["pool"]

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    batches = [images[i:i + args.feature_batch].to(args.device) for i in range(0, args.images, args.feature_batch)]
    reference = FrechetInceptionDistance(feature=Pool(), sync_on_compute=False).to(args.device)
    ours = FrechetStats.empty(net.num_features)
    reference.update(batches[0], real=True)
    ours.update(net(batches[0])["pool"])  # warm-up both

    def run_ours() -> float:
        sync(args.device)
        t0 = time.perf_counter()
        stats = FrechetStats.empty(net.num_features)
        for b in batches:
            stats.update(net(b)["pool"])
        sync(args.device)
        return time.perf_counter() - t0

    def run_reference() -> float:
        sync(args.device)
        t0 = time.perf_counter()
        reference.reset()
        for b in batches:
            reference.update(b, real=True)
        sync(args.device)
        return time.perf_counter() - t0

    ours_times, ref_times = [], []
    for _ in range(args.repeat):  # interleaved rounds: a busy neighbour slows both alike
        ours_times.append(run_ours())
        ref_times.append(run_reference())
    ours_s, ref_s = min(ours_times), min(ref_times)
    return {"images": args.images, "size": args.size, "feature_net": args.inception_weights or "tiny",
            "ours_images_per_s": args.images / ours_s, "torchmetrics_images_per_s": args.images / ref_s,
            "ours_vs_torchmetrics": ref_s / ours_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or a saved CnC pipeline folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per-core figures: 1)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256, help="images for the feature benchmark")
    parser.add_argument("--size", type=int, default=64, help="their side in pixels")
    parser.add_argument("--feature-batch", type=int, default=32)
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights (default: tiny net)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", action="append", default=[], choices=["generation", "features"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, model {args.model}")
    if "generation" not in args.skip:
        r = bench_generation(args)
        print(f"generation: {r['rows']} rows x {r['steps']} steps, batch {r['batch_size']}: "
              f"loop {r['loop_images_per_s']:.2f} img/s, batched {r['batched_images_per_s']:.2f} img/s "
              f"({r['batched_vs_loop']:.2f}x), generate-batch job {r['job_images_per_s']:.2f} img/s "
              f"({r['job_vs_loop']:.2f}x)")
    if "features" not in args.skip:
        r = bench_features(args)
        print(f"FID features: {r['images']} images of {r['size']} px, net {r['feature_net']}: "
              f"ours {r['ours_images_per_s']:.1f} img/s, torchmetrics {r['torchmetrics_images_per_s']:.1f} img/s "
              f"({r['ours_vs_torchmetrics']:.2f}x)")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
