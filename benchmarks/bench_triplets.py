"""build-triplets throughput: batched stages vs the reference approach, and the Ray Data job vs the
inline model-compute bound.

    .venv/bin/python benchmarks/bench_triplets.py --n 32 --size 128 --batch-size 8
    .venv/bin/python benchmarks/bench_triplets.py --n 64 --size 128 --batch-size 8 --ray   # + the Ray job

1. reference: the paper's public scripts' approach: each model in turn over the set, one image at a
   time (micro-batch 1), same models and settings (``tasks.triplets.stages.run_reference``).
2. inline: every stage back to back in this process on batches of ``--batch-size``
   (``run_stages_inline``): the model-compute bound. Target: reference / inline >= 2.
   ``--threads 0`` (the default) times both with 1 torch thread and with one per core and keeps
   each approach's best: "on the same CPU" means each at its best setting on it.
3. (``--ray``) the Ray Data job (``tasks.triplets.job.run_triplets``, default pool sizes) on the same
   images, read from an ingest output, vs the inline bound (its best thread count) on the same rows.
   Target: inline / ray >= 0.85. The job runs at ``--n`` and ``--n // 2`` images: the difference
   gives its steady-state seconds per image and the fixed cost (worker processes, imports, model
   loads, final assembly) that a job pays once, both printed.

4. (``--commands``) whole ``cnc build-triplets`` commands as a user runs them (ingest included, fresh
   output each time), per ``--executor`` (default ``auto``, ``ray`` and ``local``), at ``--n`` and
   ``--n // 2`` images, alternated for ``--repeats`` rounds, medians: wall and CPU seconds, the
   steady-state seconds per image and the fixed cost a command pays once (process starts, Ray's
   start where used, imports, model builds, assembly). Target: fixed cost <= 10 s on 2 cores.

      .venv/bin/python benchmarks/bench_triplets.py --commands --n 32 --size 64 --steps 25 --repeats 3

Models are built and warmed up before timing in 1-3 (their load time is not part of those figures).
Images: photos from ``skimage.data``, resized and cropped to ``--size``, flipped/rotated to make
``--n`` distinct ones. Tiny preset (seeded random weights): the masks are not meaningful, so the
mask filter's area limits are opened up to keep every image alive through every model.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "motorcycle_left", "cat", "retina", "colorwheel")


def photos(n: int, size: int) -> list[np.ndarray]:
    """``n`` distinct RGB crops of ``size`` px from skimage's bundled photos."""
    from skimage import data

    base = []
    for name in PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception:  # noqa: BLE001 - some need pooch downloads in some versions
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        base.append(np.asarray(PIL.Image.fromarray(img[..., :3]).convert("RGB")))
    out = []
    for i in range(n):
        img = base[i % len(base)]
        variant = i // len(base)
        img = np.rot90(img, variant % 4)
        if variant % 8 >= 4:
            img = img[:, ::-1]
        pil = PIL.Image.fromarray(np.ascontiguousarray(img))
        scale = size / min(pil.size)
        pil = pil.resize((max(size, round(pil.width * scale)), max(size, round(pil.height * scale))),
                         PIL.Image.Resampling.BICUBIC)
        left, top = (pil.width - size) // 2, (pil.height - size) // 2
        out.append(np.asarray(pil.crop((left, top, left + size, top + size))))
    return out


def rows_from(images: list[np.ndarray]) -> list[dict]:
    rows = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, format="JPEG", quality=95)
        rows.append({"key": f"{i:020x}", "source_id": f"photo-{i}.png", "jpg": buf.getvalue(), "txt": "",
                     "mask_png": b"", "reject": ""})
    return rows


def stage_cfg(args: argparse.Namespace, batch_size: int) -> dict[str, dict]:
    cfg = {name: {"batch_size": batch_size} for name in ("saliency", "depth", "clip") if args.clip or name != "clip"}
    cfg["inpaint"] = {"batch_size": batch_size, "num_inference_steps": args.steps}
    cfg["mask_filter"] = {"min_area": 0.0, "max_area": 1.0}
    return cfg


def per_stage(stages) -> str:
    return "  ".join(f"{s.name} {s.counters['seconds']:.2f}s" for s in stages)


def reset(stages) -> None:
    for s in stages:
        s.counters.clear()


def thread_counts(args: argparse.Namespace) -> list[int]:
    import os

    return [args.threads] if args.threads else sorted({1, os.cpu_count() or 1})


def timed(fn, threads: int, repeats: int) -> tuple[float, list]:
    """Best of ``repeats`` wall seconds of ``fn()`` with ``threads`` torch threads, and its output."""
    import torch

    torch.set_num_threads(threads)
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="images")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=8, help="model micro-batch of every stage (inline and Ray)")
    ap.add_argument("--steps", type=int, default=25, help="inpainting steps (25 = the reference setting)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both approaches (0 = try 1 and one per core, keep each one's best)")
    ap.add_argument("--clip", action="store_true", help="include the CLIP stage")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats (the best is kept)")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Data job against the inline bound")
    ap.add_argument("--commands", action="store_true",
                    help="only time whole `cnc build-triplets` commands per executor (fixed cost, steady state)")
    ap.add_argument("--executors", default="auto,ray,local", help="--commands: the executors to time")
    args = ap.parse_args()
    if args.commands:
        time_commands(args)
        return

    from tasks.triplets.stages import build_stages, run_reference, run_stages_inline

    rows = rows_from(photos(args.n, args.size))
    print(f"{len(rows)} images of {args.size}px, tiny preset, {args.steps} inpainting steps, batch {args.batch_size},"
          f" clip={args.clip}, torch threads tried: {thread_counts(args)}")
    ref_stages = build_stages("tiny", clip=args.clip, stage_cfg={k: {**v, "batch_size": 1, "pad_batches": False}
                                                                 for k, v in stage_cfg(args, 1).items()})
    inl_stages = build_stages("tiny", clip=args.clip, stage_cfg=stage_cfg(args, args.batch_size))
    results = {}
    for threads in thread_counts(args):
        timed(lambda: run_reference(rows[:2], stages=ref_stages), threads, 1)  # warm-up: first calls are slow
        timed(lambda: run_stages_inline(rows[:args.batch_size], batch_size=args.batch_size, stages=inl_stages),
              threads, 1)
        reset(ref_stages)
        ref_s, ref_out = timed(lambda: run_reference(rows, stages=ref_stages), threads, args.repeats)
        ref_detail = per_stage(ref_stages)
        reset(inl_stages)
        inl_s, inl_out = timed(lambda: run_stages_inline(rows, batch_size=args.batch_size, stages=inl_stages),
                               threads, args.repeats)
        assert [r["reject"] for r in ref_out] == [r["reject"] for r in inl_out]
        results[threads] = (ref_s, inl_s)
        print(f"[{threads} thread(s)] reference (one image at a time): {ref_s:7.2f}s {len(rows) / ref_s:6.2f} img/s"
              f"   [{ref_detail}]")
        print(f"[{threads} thread(s)] stages inline (batched):         {inl_s:7.2f}s {len(rows) / inl_s:6.2f} img/s"
              f"   [{per_stage(inl_stages)}]")
    ref_t = min(results, key=lambda t: results[t][0])
    inl_t = min(results, key=lambda t: results[t][1])
    best_ref, best_inl = results[ref_t][0], results[inl_t][1]
    print(f"triplets {sum(not r['reject'] for r in inl_out)}/{len(rows)}")
    print(f"RATIO stages/reference speed-up: {best_ref / best_inl:.2f}x   (target >= 2; each at its best: "
          f"reference {ref_t} thread(s), batched {inl_t})")

    if args.ray:
        time_ray_job(args, inl_stages, inl_t)


def time_ray_job(args: argparse.Namespace, inl_stages, threads: int) -> None:
    """The Ray Data job at --n and --n // 2 images against the inline bound on the same rows."""
    from tasks.ingest import run_ingest
    from tasks.ray_runtime import init_ray
    from tasks.triplets.job import StageOptions, ingest_rows, run_triplets
    from tasks.triplets.stages import run_stages_inline

    cfg = stage_cfg(args, args.batch_size)
    stages = {name: StageOptions(batch_size=args.batch_size, cfg={k: v for k, v in c.items() if k != "batch_size"})
              for name, c in cfg.items()}
    init_ray()  # started before timing: a cluster is up before a job is submitted to it
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n // 2, args.n):
            folder = Path(tmp) / f"photos-{n}"
            folder.mkdir()
            for i, img in enumerate(photos(n, args.size)):
                PIL.Image.fromarray(img).save(folder / f"photo-{i:04d}.png")
            ingest_url = str(Path(tmp) / f"ingest-{n}")
            res = run_ingest("folder", str(folder), ingest_url, size=args.size, shard_size=max(1, n // 4),
                             executor="local")
            rows = [r for i in range(len(res.shard_urls)) for r in ingest_rows(ingest_url, i, set())]
            inline_s, _ = timed(lambda: run_stages_inline(rows, batch_size=args.batch_size, stages=inl_stages),
                                threads, 1)
            t0 = time.perf_counter()
            result = run_triplets(ingest_url, str(Path(tmp) / f"triplets-{n}"), preset="tiny", clip=args.clip,
                                  stages=stages)
            ray_s = time.perf_counter() - t0
            runs[n] = (inline_s, ray_s)
            print(f"[{n} images] inline bound ({threads} thread(s)): {inline_s:7.2f}s   ray job: {ray_s:7.2f}s "
                  f"({result.num_triplets} triplets, {result.num_rejects} rejects)   ray per-stage compute: "
                  + "  ".join(f"{k} {v:.2f}s" for k, v in sorted(result.stage_seconds.items())))
    (i1, r1), (i2, r2) = runs[args.n // 2], runs[args.n]
    dn = args.n - args.n // 2
    ray_marginal, inline_marginal = (r2 - r1) / dn, (i2 - i1) / dn
    print(f"ray job steady state {ray_marginal:.3f} s/img, fixed cost per job {r2 - args.n * ray_marginal:.1f}s;"
          f" inline {inline_marginal:.3f} s/img")
    print(f"RATIO ray job / inline bound, end to end at {args.n} images: {i2 / r2:.2f}   (target >= 0.85)")
    print(f"RATIO ray job / inline bound, steady state: {inline_marginal / ray_marginal:.2f}")


def time_commands(args: argparse.Namespace) -> None:
    """Whole ``cnc build-triplets`` commands per executor at n // 2 and n images, alternated."""
    import os
    import shutil
    import statistics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_ingest import _timed  # noqa: E402 - the same timing of a command as the ingest benchmark

    # `cnc` as `python -m flows.cli` from this checkout (an installed `cnc` may run another checkout's code)
    cnc = [sys.executable, "-m", "flows.cli"]
    executors = [e for e in args.executors.split(",") if e]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    sizes = (args.n // 2, args.n)
    times: dict[tuple[str, int], list[tuple[float, float]]] = {(e, n): [] for e in executors for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / f"photos-{n}"
            folder.mkdir()
            for i, img in enumerate(photos(n, args.size)):
                PIL.Image.fromarray(img).save(folder / f"photo-{i:04d}.png")
        for r in range(args.repeats):
            order = executors if r % 2 == 0 else executors[::-1]
            print(f"-- round {r + 1}/{args.repeats} (load average {os.getloadavg()[0]:.1f})")
            for ex in order:
                for n in sizes:
                    out = Path(tmp) / f"out-{ex}-{n}"
                    shutil.rmtree(out, ignore_errors=True)
                    src = str(Path(tmp) / f"photos-{n}")
                    cmd = [*cnc, "build-triplets", "--source-format", "folder", "--source", src,
                           "--out", str(out), "--size", str(args.size), "--shard-size", str(max(1, n // 2)),
                           "--inpaint-steps", str(args.steps), "--executor", ex]
                    wall, cpu = _timed(cmd, env, ROOT)
                    times[(ex, n)].append((wall, cpu))
                    print(f"  {ex:10s} {n:4d} images  {wall:7.2f}s wall  {cpu:7.2f}s CPU")
    print(f"\nwhole `cnc build-triplets` commands, {args.size}px, {args.steps} steps, tiny preset, "
          f"{os.cpu_count()} cores, median of {args.repeats} rounds:")
    dn = sizes[1] - sizes[0]
    for ex in executors:
        (w1, c1), (w2, c2) = ((statistics.median(t[0] for t in times[(ex, n)]),
                               statistics.median(t[1] for t in times[(ex, n)])) for n in sizes)
        per_image, cpu_per_image = (w2 - w1) / dn, (c2 - c1) / dn
        print(f"  {ex:10s} {sizes[0]} images {w1:6.2f}s, {sizes[1]} images {w2:6.2f}s wall ({c2:6.2f}s CPU); "
              f"steady state {per_image:.3f} s/img ({cpu_per_image:.3f} CPU-s); fixed cost "
              f"{w2 - sizes[1] * per_image:5.2f}s wall (target <= 10 s), {c2 - sizes[1] * cpu_per_image:5.2f} CPU-s")


if __name__ == "__main__":
    main()
