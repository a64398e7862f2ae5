"""Ingest throughput: our `run_ingest` against img2dataset, on the same JPEGs and cores, in one run.

What it does:
  1. builds (once, cached under --workdir) a corpus of --n JPEGs, 640-2048 px on the long side, of
     various aspect ratios, qualities and chroma subsamplings, cut from the real photos that ship with
     scikit-image (crops, flips, rescales, a little film grain so upscaled crops keep photo-like detail),
     each with a same-name .txt caption; plus a CSV url list (file:// URLs + captions) for img2dataset;
  2. runs our ingest with ``executor="local"`` (one process, one core) in a fresh subprocess, reporting
     its peak RSS (getrusage);
  3. runs our ingest with ``executor="ray"`` on a local Ray started with ``ray.init(num_cpus=N)``
     (start-up timed apart from the job), reporting the peak RSS of each Ray worker (/proc VmHWM);
  4. runs img2dataset (512 px, center_crop, webdataset) in its own virtual environment
     (``<workdir>/venv-img2dataset``, created with ``python3 -m venv`` + ``pip install img2dataset`` if
     missing) with processes_count=N;
  5. checks every output has the same number of 512x512 samples, prints images/s/core and the ratios.

Each runner is timed by wall clock and by CPU seconds summed over all of its processes (getrusage of
the process and its reaped children, or psutil over the Ray process tree): on a machine shared with
other work the wall clock mostly measures the neighbours, CPU seconds much less. ``--repeat K``
interleaves K rounds and keeps each runner's best.

``--commands`` instead times whole commands as a user runs them, alternated for ``--repeat``
rounds, and prints medians: ``cnc ingest`` (default executor ``auto``, or ``--cnc-executor``) and
img2dataset's own command line, on the same files and cores; the ratio is img2dataset's wall clock
over ours (throughput, higher is better; targets: >= 1.0 at 500 images, >= 2.0 at 5000).

Run:  .venv/bin/python benchmarks/bench_ingest.py [--n 500] [--cores 2] [--repeat 3] [--profile]
      .venv/bin/python benchmarks/bench_ingest.py --commands --n 500 --repeat 5
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS_VERSION = 1
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3 / 4, 2 / 3, 9 / 16, 1 / 2)
QUALITIES = (70, 75, 80, 85, 90, 95)


# ------------------------------------------------------------------------------------- corpus


def build_corpus(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``root/images`` (n JPEGs + captions) and ``root/urls.csv``; reused when already built alike."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from tasks.sample_images import SAMPLE_PHOTOS, sample_photo_bytes

    images, url_list, stamp = root / "images", root / "urls.csv", root / "corpus.json"
    wanted = {"version": CORPUS_VERSION, "n": n, "seed": seed, "photos": sorted(SAMPLE_PHOTOS)}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and url_list.exists():
        return images, url_list
    print(f"building a corpus of {n} JPEGs under {images} ...", flush=True)
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    images.mkdir(parents=True)
    photos = [(name, Image.open(io.BytesIO(sample_photo_bytes(name))).convert("RGB"))
              for name in sorted(SAMPLE_PHOTOS)]
    rows = []
    total_bytes = 0
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        name, photo = photos[i % len(photos)]
        aspect = float(rng.choice(ASPECTS))
        w, h = photo.size
        # the largest crop of this aspect, shrunk by 65-100 %, placed anywhere
        cw, ch = (w, round(w / aspect)) if w / h <= aspect else (round(h * aspect), h)
        scale = rng.uniform(0.65, 1.0)
        cw, ch = max(16, round(cw * scale)), max(16, round(ch * scale))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        long_side = int(rng.integers(640, 2049))
        f = long_side / max(cw, ch)
        img = img.resize((max(1, round(cw * f)), max(1, round(ch * f))), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.int16)
        grain = rng.normal(0.0, rng.uniform(2.0, 5.0), size=arr.shape[:2] + (1,))
        img = Image.fromarray(np.clip(arr + grain, 0, 255).astype(np.uint8))
        path = images / f"img-{i:05d}.jpg"
        img.save(path, "JPEG", quality=int(rng.choice(QUALITIES)), subsampling=0 if rng.random() < 0.25 else 2,
                 progressive=bool(rng.random() < 0.15), optimize=False)
        total_bytes += path.stat().st_size
        caption = f"{SAMPLE_PHOTOS[name]} (variant {i})"
        path.with_suffix(".txt").write_text(caption)
        rows.append({"url": path.resolve().as_uri(), "caption": caption})
    with url_list.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    stamp.write_text(json.dumps(wanted))
    print(f"  built in {time.perf_counter() - t0:.1f}s, {total_bytes / 2**20:.0f} MiB", flush=True)
    return images, url_list


def describe_corpus(images: Path) -> str:
    from PIL import Image

    sizes = []
    for p in sorted(images.glob("*.jpg")):
        with Image.open(p) as im:
            sizes.append(im.size)
    longs = [max(s) for s in sizes]
    mp = sum(w * h for w, h in sizes) / len(sizes) / 1e6
    mib = sum(p.stat().st_size for p in images.glob("*.jpg")) / 2**20
    return (f"{len(sizes)} JPEGs, long side {min(longs)}-{max(longs)} px, mean {mp:.2f} MP, "
            f"{mib:.0f} MiB")


# ------------------------------------------------------------------------- our ingest (children)


def _child_local(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: our ingest on one core, with its peak RSS."""
    import resource

    sys.path.insert(0, str(REPO))
    from tasks.ingest import run_ingest

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = cpu()
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(run_ingest, "folder", args.source, args.out, size=args.size,
                              shard_size=args.shard_size, executor="local")
        stats = pstats.Stats(prof, stream=sys.stderr)
        print("\n--- cProfile of the local executor (top 25 by internal time) ---", file=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
        print("--- (top 20 by cumulative time) ---", file=sys.stderr)
        stats.sort_stats("cumulative").print_stats(20)
    else:
        result = run_ingest("folder", args.source, args.out, size=args.size, shard_size=args.shard_size,
                            executor="local")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": cpu() - cpu0, "samples": result.num_samples, "rejects": result.num_rejects,
            "inputs": result.num_inputs, "rejects_by_reason": result.rejects_by_reason,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_job_mib": rss_before / 1024}


def _vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _TreeWatch(threading.Thread):
    """Polls this process and everything under it (local Ray: driver -> raylet, GCS -> workers).

    Keeps, per process, the CPU time used since the watch started (a process born later counts from
    zero) and, for Ray workers that ran a task, the peak RSS (the kernel's VmHWM).
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self._root = psutil.Process(os.getpid())
        self.base_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.peak: dict[int, float] = {}
        self.title: dict[int, str] = {}
        self.ran_task: set[int] = set()
        self._halt = threading.Event()
        self.own_cpu_s = 0.0  # the watcher's own CPU, taken off the driver's
        self.poll(baseline=True)

    def poll(self, baseline: bool = False) -> None:
        import psutil

        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                title = " ".join(proc.cmdline())
            except (psutil.Error, OSError):
                continue
            used = t.user + t.system
            if baseline:
                self.base_cpu[proc.pid] = used
            self.base_cpu.setdefault(proc.pid, 0.0)
            self.last_cpu[proc.pid] = used
            if proc.pid == self._root.pid:
                self.title[proc.pid] = "driver (run_ingest)"
            elif title.startswith("ray::"):
                if "IDLE" not in title or proc.pid not in self.title:
                    self.title[proc.pid] = title.split()[0].split(".")[0]  # "ray::_StatsActor.method" -> actor
            else:
                self.title[proc.pid] = os.path.basename(title.split()[0]) if title else "?"
            if title.startswith("ray::"):
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0.0), _vm_hwm_mib(proc.pid))
                if "IDLE" not in title:
                    self.ran_task.add(proc.pid)

    @property
    def cpu_s(self) -> float:
        return sum(self.last_cpu[p] - self.base_cpu[p] for p in self.last_cpu) - self.own_cpu_s

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, used in self.last_cpu.items():
            kind = self.title.get(pid, "?")
            out[kind] = out.get(kind, 0.0) + used - self.base_cpu[pid]
        out["driver (run_ingest)"] -= self.own_cpu_s
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    @property
    def worker_peak_rss_mib(self) -> dict[str, float]:
        """Peak RSS of each Ray worker process that ran something, by what it last ran."""
        workers = {pid: mib for pid, mib in self.peak.items() if pid in self.ran_task} or self.peak
        return {f"{self.title.get(pid, '?')}[{pid}]": round(mib) for pid, mib in sorted(workers.items())}

    def run(self) -> None:
        while not self._halt.wait(0.25):
            self.poll()
        self.own_cpu_s = time.thread_time()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.poll()


def _child_ray(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: ray.init(num_cpus=N), then our ingest on Ray Data."""
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    import ray

    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    from tasks.ingest import run_ingest

    watch = _TreeWatch()
    watch.start()
    task_seconds: list[float] = []
    t1 = time.perf_counter()
    result = run_ingest("folder", args.source, args.out, size=args.size, shard_size=args.shard_size,
                        executor="ray", on_shard=lambda row: task_seconds.append(float(row.get("seconds", 0.0))))
    wall = time.perf_counter() - t1
    watch.stop()
    ray.shutdown()
    return {"ray_start_s": ray_start, "wall_s": wall, "samples": result.num_samples, "rejects": result.num_rejects,
            "inputs": result.num_inputs, "rejects_by_reason": result.rejects_by_reason,
            "sum_task_s": sum(task_seconds), "shards": len(task_seconds), "cpu_s": watch.cpu_s,
            "cpu_by_kind": watch.cpu_by_kind(), "worker_peak_rss_mib": watch.worker_peak_rss_mib}


def run_child(kind: str, args: argparse.Namespace, source: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, "--_source", str(source), "--_out",
           str(out), "--size", str(args.size), "--shard-size", str(args.shard_size), "--cores", str(args.cores)]
    if args.profile and kind == "local":
        cmd.append("--profile")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = out.parent / f"{out.name}.stderr.log"  # Ray's and the profiler's chatter
    with log.open("w") as err:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if args.profile and kind == "local":
        sys.stdout.write(log.read_text())
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"our ingest ({kind}) failed with exit code {proc.returncode}; log: {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ img2dataset

I2D_RUNNER = textwrap.dedent("""
    import json, resource, sys, time
    def cpu(who):
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime
    t0 = time.perf_counter()
    from img2dataset import download
    t1 = time.perf_counter()
    cpu1 = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
    download(**json.loads(sys.argv[1]))
    t2 = time.perf_counter()
    cpu2 = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
    print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1, "cpu_s": cpu2 - cpu1}))
""")


def ensure_img2dataset(venv: Path) -> Path:
    python = venv / "bin" / "python"
    ok = python.exists() and subprocess.run([str(python), "-c", "import img2dataset"], capture_output=True,
                                            env=_i2d_env()).returncode == 0
    if not ok:
        print(f"img2dataset is not installed in {venv}; creating it (about a minute):\n"
              f"  python3 -m venv {venv}\n  {python} -m pip install img2dataset", flush=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "img2dataset"], check=True,
                       stderr=subprocess.DEVNULL)
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    print(f"img2dataset {version} from {venv}", flush=True)
    return python


def _i2d_env() -> dict[str, str]:
    # albumentations otherwise asks the network for a newer version at import
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def run_img2dataset(python: Path, args: argparse.Namespace, url_list: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    params = {
        "url_list": str(url_list), "input_format": "csv", "url_col": "url", "caption_col": "caption",
        "output_folder": str(out), "output_format": "webdataset", "image_size": args.size,
        "resize_mode": "center_crop", "encode_quality": 95, "processes_count": args.cores,
        "thread_count": args.i2d_threads, "number_sample_per_shard": args.shard_size, "timeout": 30, "retries": 0,
        "enable_wandb": False,
    }
    if args.i2d_lean:
        params.update(extract_exif=False, compute_hash=None)
    t0 = time.perf_counter()
    # cwd: `python -c` puts it on sys.path, and a folder such as /tmp holds Ray's session dir "ray/"
    proc = subprocess.run([str(python), "-c", I2D_RUNNER, json.dumps(params)], env=_i2d_env(), cwd=python.parent,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"img2dataset failed with exit code {proc.returncode}")
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    return {"wall_s": wall, **timing, "successes": sum(s["successes"] for s in stats),
            "failed": sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats),
            "shard_span_s": (max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)) if stats else 0.0,
            "params": params}


# ------------------------------------------------------------------------------- whole commands


def _timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and the children it reaped) of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed with exit code {proc.returncode}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu


def run_commands(args: argparse.Namespace, python: Path, images: Path, url_list: Path, work: Path) -> int:
    """``cnc ingest`` vs ``img2dataset`` as whole commands, alternated; medians and the ratio."""
    import statistics

    ours_out, i2d_out = work / "cmd-ours", work / "cmd-img2dataset"
    cnc = [sys.executable, "-m", "flows.cli", "ingest", "--source-format", "folder", "--source", str(images),
           "--out", str(ours_out), "--size", str(args.size), "--shard-size", str(args.shard_size),
           "--executor", args.cnc_executor]
    i2d = [str(python.parent / "img2dataset"), f"--url_list={url_list}", "--input_format=csv", "--url_col=url",
           "--caption_col=caption", f"--output_folder={i2d_out}", "--output_format=webdataset",
           f"--image_size={args.size}", "--resize_mode=center_crop", "--encode_quality=95",
           f"--processes_count={args.cores}", f"--thread_count={args.i2d_threads}",
           f"--number_sample_per_shard={args.shard_size}", "--enable_wandb=False"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    times: dict[str, list[tuple[float, float]]] = {"cnc ingest": [], "img2dataset": []}
    for round_ in range(1, args.repeat + 1):
        print(f"-- round {round_}/{args.repeat} (load average {os.getloadavg()[0]:.1f})", flush=True)
        for name, cmd, out, cwd in (("img2dataset", i2d, i2d_out, python.parent),
                                    ("cnc ingest", cnc, ours_out, REPO))[:: 1 if round_ % 2 else -1]:
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu = _timed(cmd, _i2d_env() if name == "img2dataset" else env, cwd)
            times[name].append((wall, cpu))
            print(f"  {name:12s} {wall:6.2f}s wall {cpu:6.2f}s CPU", flush=True)
    ours = count_tar_samples(sorted((ours_out / "shards").glob("*.tar")))
    theirs = count_tar_samples(sorted(i2d_out.glob("*.tar")))
    same = ours[0] == theirs[0] == args.n and ours[1] == theirs[1] == {(args.size, args.size)}
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    print(f"\nwhole commands, {args.n} images, {args.cores} cores, median of {args.repeat} rounds:")
    for k, (w, c) in med.items():
        print(f"  {k:12s} {w:6.2f}s wall ({args.n / w:6.1f} images/s), {c:6.2f}s CPU")
    ratio = med["img2dataset"][0] / med["cnc ingest"][0]
    target = 2.0 if args.n >= 5000 else 1.0
    print(f"  throughput ratio cnc ingest / img2dataset: {ratio:.2f}x (target >= {target:.1f}x: "
          f"{'met' if ratio >= target else 'NOT met'}); same samples: {'yes' if same else 'NO'}")
    return 0 if same else 1


# ---------------------------------------------------------------------------------------- checks


def count_tar_samples(tars: list[Path]) -> tuple[int, set[tuple[int, int]]]:
    """Number of .jpg members over ``tars`` and the set of their image sizes (first 20 checked)."""
    from PIL import Image

    count, sizes = 0, set()
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    if count < 20:
                        with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                            sizes.add(im.size)
                    count += 1
    return count, sizes


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500, help="corpus size (images)")
    p.add_argument("--workdir", default="/tmp/cnc-bench-ingest", help="corpus, outputs and img2dataset's venv")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores for Ray and img2dataset")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard, ours and img2dataset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--i2d-threads", type=int, default=4, help="img2dataset thread_count (file reads)")
    p.add_argument("--i2d-lean", action="store_true",
                   help="img2dataset without its default EXIF extraction and sha256 (a stronger baseline)")
    p.add_argument("--repeat", type=int, default=1, help="rounds (img2dataset, local, Ray in turn); best of each")
    p.add_argument("--skip", action="append", default=[], choices=["local", "ray", "img2dataset"])
    p.add_argument("--profile", action="store_true", help="cProfile the local executor (printed to stderr)")
    p.add_argument("--commands", action="store_true", help="time whole commands: cnc ingest vs img2dataset")
    p.add_argument("--cnc-executor", default="auto", help="--executor of cnc ingest in --commands mode")
    p.add_argument("--_child", choices=["local", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--_source", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.source, args.out = args._source, args._out
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        fn = _child_local if args._child == "local" else _child_ray
        print(json.dumps(fn(args)), flush=True)
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images, url_list = build_corpus(work / f"corpus-{args.n}-{args.seed}", args.n, args.seed)
    print(f"corpus: {describe_corpus(images)}", flush=True)
    print(f"cores: {args.cores} (machine has {os.cpu_count()}), size {args.size}, shard size {args.shard_size}",
          flush=True)
    n, c = args.n, args.cores
    counts: dict[str, tuple[int, set]] = {}
    # name -> (cores, best wall seconds, best CPU seconds) of the measured work, over the rounds
    runs: dict[str, tuple[int, float, float]] = {}

    def keep(name: str, cores: int, wall: float, cpu: float) -> None:
        _, w0, c0 = runs.get(name, (cores, float("inf"), float("inf")))
        runs[name] = (cores, min(w0, wall), min(c0, cpu))

    python = None if "img2dataset" in args.skip else ensure_img2dataset(work / "venv-img2dataset")
    if args.commands:
        if python is None:
            raise SystemExit("--commands compares with img2dataset: do not skip it")
        return run_commands(args, python, images, url_list, work)
    for round_ in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"-- round {round_}/{args.repeat} (load average {os.getloadavg()[0]:.1f})", flush=True)
        if python is not None:
            out = work / "out-img2dataset"
            r = run_img2dataset(python, args, url_list, out)
            keep(f"img2dataset, {c} processes", c, r["download_s"], r["cpu_s"])
            counts["img2dataset"] = count_tar_samples(sorted(out.glob("*.tar")))
            print(f"img2dataset: {c} processes x {args.i2d_threads} threads: download() {r['download_s']:.2f}s "
                  f"wall, {r['cpu_s']:.2f}s CPU (+ import {r['import_s']:.2f}s); {r['successes']} ok, "
                  f"{r['failed']} failed", flush=True)
        if "local" not in args.skip:
            out = work / "out-ours-local"
            r = run_child("local", args, images, out)
            keep("ours, local executor, 1 process", 1, r["wall_s"], r["cpu_s"])
            counts["ours-local"] = count_tar_samples(sorted((out / "shards").glob("*.tar")))
            print(f"ours, local: run_ingest {r['wall_s']:.2f}s wall, {r['cpu_s']:.2f}s CPU; {r['samples']} ok, "
                  f"{r['rejects']} rejects {r['rejects_by_reason'] or ''}; peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"({r['rss_before_job_mib']:.0f} MiB of it after imports, before the job)", flush=True)
        if "ray" not in args.skip:
            out = work / "out-ours-ray"
            r = run_child("ray", args, images, out)
            keep(f"ours, Ray, num_cpus={c}", c, r["wall_s"], r["cpu_s"])
            counts["ours-ray"] = count_tar_samples(sorted((out / "shards").glob("*.tar")))
            print(f"ours, Ray: ray.init(num_cpus={c}) {r['ray_start_s']:.2f}s (not counted); run_ingest "
                  f"{r['wall_s']:.2f}s wall, {r['cpu_s']:.2f}s CPU in all Ray processes, {r['shards']} shard tasks "
                  f"{r['sum_task_s']:.2f}s wall inside them; {r['samples']} ok, {r['rejects']} rejects\n"
                  f"  CPU seconds by process: {r['cpu_by_kind']}\n"
                  f"  peak RSS by Ray worker (MiB): {r['worker_peak_rss_mib']}", flush=True)

    if not counts:
        return 0
    print("\nsamples per output:", ", ".join(f"{k} {v[0]} (sizes {sorted(v[1])})" for k, v in counts.items()))
    same = len({v[0] for v in counts.values()}) == 1 and all(v[1] == {(args.size, args.size)} for v in counts.values())
    print("same number of samples, all {0}x{0}: {1}".format(args.size, "yes" if same else "NO"))

    best = f"best of {args.repeat} rounds, " if args.repeat > 1 else ""
    print(f"\nimages/s/core over {n} images ({best}wall: n / (seconds x cores); CPU: n / CPU-seconds, which "
          f"other load on the machine disturbs less)")
    print(f"  {'':34s} {'wall':>7s} {'CPU':>7s}")
    rates = {k: (n / (wall * cores), n / cpu) for k, (cores, wall, cpu) in runs.items()}
    for k, (w, cpu_rate) in rates.items():
        print(f"  {k:34s} {w:7.1f} {cpu_rate:7.1f}")
    base = next((v for k, v in rates.items() if k.startswith("img2dataset")), None)
    if base:
        for k, (w, cpu_rate) in rates.items():
            if not k.startswith("img2dataset"):
                ratio = w / base[0]
                cpu_ratio = cpu_rate / base[1]
                print(f"  ratio {k} / img2dataset: {ratio:.2f}x per core by wall, {cpu_ratio:.2f}x by CPU "
                      f"(target >= 2x per core, judged by CPU: {'met' if cpu_ratio >= 2 else 'NOT met'})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
