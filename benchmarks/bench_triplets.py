"""build-triplets throughput: batched stages vs the reference approach, and (hook) the Ray Data job
vs the inline model-compute bound.

    .venv/bin/python benchmarks/bench_triplets.py --n 16 --size 128 --batch-size 8
    .venv/bin/python benchmarks/bench_triplets.py --n 16 --size 128 --batch-size 8 --ray   # + the Ray job

1. reference: the paper's public scripts' approach: each model in turn over the set, one image at a
   time (micro-batch 1), same models and settings (``tasks.triplets.stages.run_reference``).
2. inline: every stage back to back in this process on batches of ``--batch-size``
   (``run_stages_inline``): the model-compute bound. Target: reference / inline >= 2.
3. (``--ray``) the Ray Data job (``tasks.triplets.job.run_triplets``) on the same images, read from
   an ingest output, vs the inline bound on the same rows. Target: inline / ray >= 0.85.

Models are built and warmed up before timing (their load time is not part of either figure).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=8, help="model micro-batch of every stage (inline and Ray)")
    ap.add_argument("--steps", type=int, default=25, help="inpainting steps (25 = the reference setting)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--reference-threads", type=int, default=0,
                    help="torch threads while the reference runs (0 = same as --threads); batch-1 calls of tiny "
                         "models can run slower on 2 threads than on 1 on a busy 2-core machine")
    ap.add_argument("--clip", action="store_true", help="include the CLIP stage")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats (the best is kept)")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Data job against the inline bound")
    args = ap.parse_args()

    import torch

    from tasks.triplets.stages import build_stages, run_reference, run_stages_inline

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    ref_threads = args.reference_threads or threads
    images = photos(args.n, args.size)
    rows = rows_from(images)
    print(f"{len(rows)} images of {args.size}px, tiny preset, {args.steps} inpainting steps, batch {args.batch_size},"
          f" torch threads {threads} (reference {ref_threads}), clip={args.clip}")

    ref_stages = build_stages("tiny", clip=args.clip, stage_cfg={k: {**v, "batch_size": 1, "pad_batches": False}
                                                                 for k, v in stage_cfg(args, 1).items()})
    inl_stages = build_stages("tiny", clip=args.clip, stage_cfg=stage_cfg(args, args.batch_size))
    torch.set_num_threads(ref_threads)
    run_reference(rows[:2], stages=ref_stages)  # warm-up: first calls of each shape are slow
    torch.set_num_threads(threads)
    run_stages_inline(rows[:args.batch_size], batch_size=args.batch_size, stages=inl_stages)

    best_ref = best_inl = float("inf")
    for _ in range(args.repeats):
        reset(ref_stages)
        torch.set_num_threads(ref_threads)
        t0 = time.perf_counter()
        ref_out = run_reference(rows, stages=ref_stages)
        best_ref = min(best_ref, time.perf_counter() - t0)
        torch.set_num_threads(threads)
        reset(inl_stages)
        t0 = time.perf_counter()
        inl_out = run_stages_inline(rows, batch_size=args.batch_size, stages=inl_stages)
        best_inl = min(best_inl, time.perf_counter() - t0)
    alive = sum(not r["reject"] for r in inl_out)
    assert [r["reject"] for r in ref_out] == [r["reject"] for r in inl_out]
    print(f"reference (one image at a time): {best_ref:7.2f}s  {len(rows) / best_ref:6.2f} img/s   "
          f"[{per_stage(ref_stages)}]")
    print(f"stages inline (batched):         {best_inl:7.2f}s  {len(rows) / best_inl:6.2f} img/s   "
          f"[{per_stage(inl_stages)}]")
    print(f"triplets {alive}/{len(rows)}")
    print(f"RATIO stages/reference speed-up: {best_ref / best_inl:.2f}x   (target >= 2)")

    if args.ray:
        time_ray_job(args, images, inl_stages)


# ============================================================================================ #
# HOOK: the Ray Data job (tasks.triplets.job.run_triplets, by the lead) vs the inline bound.   #
# Same images (read back from an ingest output, so both see the same JPEG bytes), same stage   #
# batch sizes and settings. Target: inline seconds / ray seconds >= 0.85.                      #
# ============================================================================================ #
def time_ray_job(args: argparse.Namespace, images: list[np.ndarray], inl_stages) -> None:
    try:
        from tasks.ingest import run_ingest
        from tasks.ray_runtime import init_ray
        from tasks.triplets.job import StageOptions, ingest_rows, run_triplets
    except ImportError as e:  # the job is not there yet
        print(f"ray job: skipped ({e})")
        return
    from tasks.triplets.stages import run_stages_inline

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, img in enumerate(images):
            PIL.Image.fromarray(img).save(folder / f"photo-{i:04d}.png")
        ingest_url = str(Path(tmp) / "ingest")
        res = run_ingest("folder", str(folder), ingest_url, size=args.size, shard_size=max(1, args.n // 4),
                         executor="local")
        rows = [r for i in range(len(res.shard_urls)) for r in ingest_rows(ingest_url, i, set())]
        reset(inl_stages)
        t0 = time.perf_counter()
        run_stages_inline(rows, batch_size=args.batch_size, stages=inl_stages)
        inline_s = time.perf_counter() - t0
        init_ray()
        cfg = stage_cfg(args, args.batch_size)
        stages = {name: StageOptions(batch_size=args.batch_size, cfg={k: v for k, v in c.items() if k != "batch_size"})
                  for name, c in cfg.items()}
        t0 = time.perf_counter()
        result = run_triplets(ingest_url, str(Path(tmp) / "triplets"), preset="tiny", clip=args.clip, stages=stages)
        ray_s = time.perf_counter() - t0
    print(f"inline bound on the ingested rows: {inline_s:7.2f}s   ray job: {ray_s:7.2f}s "
          f"({result.num_triplets} triplets, {result.num_rejects} rejects)")
    print("ray per-stage seconds: " + "  ".join(f"{k} {v:.2f}s" for k, v in sorted(result.stage_seconds.items())))
    print(f"RATIO ray job / inline bound: {inline_s / ray_s:.2f}   (target >= 0.85)")


if __name__ == "__main__":
    main()
