"""``make demo``: the main job end to end on bundled photos, on the embedded defaults.

Local Ray, Prefect's local server on SQLite (ephemeral unless PREFECT_API_URL is set), a local
folder as storage and the tiny model preset: the build-triplets flow (ingest to contact sheet),
then the train-cnc flow (the three CnC stages, briefly, on Ray Train), one image generated from
the trained pipeline folder, and a short evaluation of that model (generate-batch in three
settings, evaluate-cnc) labelled as plumbing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.sample_images import write_sample_folder

ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint() -> str:
    """A hash of the project's code: a demo output made by other code is started over, since its
    recorded config may no longer match what this code writes (a re-run of the same code resumes)."""
    digest = hashlib.sha256()
    for package in ("cnc_model", "tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class NotADemoOutput(ValueError):
    """``--out`` holds ingest/triplets folders the demo did not make: refused, never deleted."""


def _start_over_if_stale(out: str) -> None:
    """Keep a demo output made by this code; start one made by other demo code over. Folders
    without the demo's stamp are not the demo's to delete: :class:`NotADemoOutput`."""
    stamp_url = storage.join(out, ".demo-code")
    stamp = code_fingerprint()
    stamped = storage.exists(stamp_url)
    if stamped and storage.read_bytes(stamp_url).decode() == stamp:
        return
    fs, root = storage.get_fs(out)
    stale = [p for p in ("ingest", "triplets", "train", "eval") if fs.exists(f"{root}/{p}")]
    if stale and not stamped:
        raise NotADemoOutput(f"{out} holds {' and '.join(stale)} that the demo did not make (no .demo-code stamp); "
                             "choose another --out or remove them yourself")
    if stale:
        print(f"demo: {out} was made by other code; starting {' and '.join(stale)} over")
        for p in stale:
            fs.rm(f"{root}/{p}", recursive=True)
    storage.write_bytes(stamp_url, stamp.encode())


def run_demo(out: str) -> dict[str, Any]:
    # The first start of the ephemeral server migrates a new SQLite database: give it time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    out = os.path.abspath(out) if "://" not in out else out
    _start_over_if_stale(out)
    from flows.params import BuildTripletsParams
    from flows.triplets_flow import build_triplets

    sources = storage.join(out, "sources")
    write_sample_folder(sources)
    params = BuildTripletsParams(source_format="folder", source=sources, out=out, preset="tiny", size=128,
                                 shard_size=4)
    result = build_triplets(params)
    ingest, triplets = result["ingest"], result["triplets"]
    print()
    print(f"demo: {ingest['num_inputs']} photos -> {ingest['num_samples']} ingested -> "
          f"{triplets['num_triplets']} triplets, {triplets['num_rejects']} rejects "
          f"in {len(triplets['shard_urls'])} shards")
    print(f"demo: triplet shards, index, manifest: {storage.join(out, 'triplets')}")
    if triplets["preview_url"]:
        print(f"demo: contact sheet: {triplets['preview_url']}")
    result["train"] = train_and_generate(storage.join(out, "triplets"), storage.join(out, "train"))
    from flows.demo_evaluation import run_demo_evaluation

    trained = storage.get_fs(result["train"]["stages"][-1]["model_url"])[1]
    result["evaluation"] = run_demo_evaluation(out, model=trained)
    return result


DEMO_TRAIN = dict(stage="all", init="tiny", workers=1, cpus_per_worker=1, decode_cpus=0.25, batch_size=3, epochs=2,
                  val_fraction=0.0, lr=1e-4, checkpoint_every=2)
"""Brief settings for the demo's six 128 px triplets: 2 steps per epoch, 2 epochs per stage."""


def train_and_generate(triplets_url: str, train_url: str) -> dict[str, Any]:
    """The train-cnc flow on the demo triplets, then one image from the final (full) stage's folder."""
    from flows.train_flow import TrainParams, train_cnc

    stages = train_cnc(TrainParams(data=triplets_url, out=train_url, **DEMO_TRAIN))
    final = stages[-1]
    image_url = storage.join(train_url, "sample.png")
    generate_sample(final["model_url"], triplets_url, image_url)
    print(f"demo: trained {', '.join(s['stage'] + ' (' + str(s['steps']) + ' steps)' for s in stages)}")
    print(f"demo: checkpoints: {final['checkpoints_url']}")
    print(f"demo: loss curves: {', '.join(s['loss_curve_url'] for s in stages)}")
    print(f"demo: trained pipeline: {final['model_url']}  (cnc generate --model DIR loads it)")
    print(f"demo: generated image: {image_url}")
    return {"stages": stages, "image_url": image_url}


def generate_sample(model_url: str, triplets_url: str, image_url: str) -> None:
    """One image with the first triplet's depth maps and fg/bg exemplars as conditions."""
    import io

    import numpy as np
    import PIL.Image
    import torch

    from cnc_model.annotators.depth import decode_depth_png16
    from cnc_model.loading import load_pipeline
    from tasks.shards import iter_tar_samples

    sample = next(iter(iter_tar_samples(storage.list_files(storage.join(triplets_url, "shards"), ".tar")[0])))
    depth = {k: torch.from_numpy(decode_depth_png16(sample[f"depth_{k}.png"]))[None, None] for k in ("fg", "bg")}
    fg, bg = (PIL.Image.open(io.BytesIO(sample[n])).convert("RGB") for n in ("fg.png", "bg.jpg"))
    side = int(np.asarray(fg).shape[0])
    pipe = load_pipeline(storage.get_fs(model_url)[1])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(sample.get("txt", b"").decode() or "a photo", fg_depth=depth["fg"], bg_depth=depth["bg"],
                 fg_exemplar=fg, bg_exemplar=bg, height=side, width=side, num_inference_steps=10,
                 generator=torch.Generator().manual_seed(0)).images[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(image_url, buf.getvalue())
