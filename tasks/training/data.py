"""Training data: triplet shards -> decoded rows -> torch batches, with a deterministic split.

The shards are the build-triplets output (docs/data-format.md). Rows are read with Ray Data's
``read_webdataset`` over the tars only (never the parquet indexes beside them), decoded in Ray
Data tasks (16-bit depth to [0, 1], mask to {0, 1}, image to [-1, 1]) and split among the Ray
Train workers. Stored VAE latents and CLIP embeddings are used when the shards have them; else
the worker encodes on the fly. The validation split is the samples whose key hashes below
``val_fraction``: the same samples whatever the worker count or shard layout.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from cnc_model.annotators.clip_embed import decode_npy
from cnc_model.annotators.depth import decode_depth_png16
from cnc_model.cnc.training import CnCBatch
from tasks import storage
from tasks.shards import iter_tar_samples, read_index

log = logging.getLogger(__name__)

MAX_SIDE = 4096
"""Largest image side a sample may have (checked from the header before decoding)."""
MAX_NPY_BYTES = 64 * 2**20
STAGE_NEEDS = {"local": ("depth",), "global": ("exemplars",), "full": ("depth", "exemplars")}


class TrainingDataError(ValueError):
    """The shards cannot feed the requested stage (a one-line message, raised before any worker starts)."""


@dataclass(frozen=True)
class Fields:
    """Which inputs the rows carry: stored latents / CLIP embeddings, or what to encode them from."""

    depth: bool
    exemplars: bool
    latents: bool
    clip: bool


@dataclass(frozen=True)
class DataPlan:
    """What the driver found: tar URLs, split sizes, fields, and the even split's padding."""

    tar_urls: tuple[str, ...]
    train_keys: int
    val_keys: int
    fields: Fields
    workers: int
    manifest_hash: str

    @property
    def pad(self) -> int:
        """Samples repeated so that every worker gets as many rows (as torch's DistributedSampler)."""
        return (-self.train_keys) % self.workers

    @property
    def rows_per_worker(self) -> int:
        return (self.train_keys + self.pad) // self.workers

    def batches_per_epoch(self, micro_batch: int) -> int:
        return -(-self.rows_per_worker // micro_batch)


def is_val(key: str, fraction: float) -> bool:
    """Whether ``key`` belongs to the validation split (hash of the key, stable everywhere)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def shards_folder(url: str) -> str:
    return storage.join(url, "shards") if storage.exists(storage.join(url, "shards")) else url


def plan_data(url: str, stage: str, val_fraction: float, workers: int) -> DataPlan:
    """List the shards, count the split from the indexes, check the fields the stage needs."""
    folder = shards_folder(url)
    tars = storage.list_files(folder, ".tar")
    if not tars:
        raise TrainingDataError(f"no triplet shards (*.tar) under {url}")
    train = val = 0
    digest = hashlib.sha256()
    for tar in tars:
        index_url = tar[: -len(".tar")] + ".parquet"
        if not storage.exists(index_url):
            raise TrainingDataError(f"shard {tar} has no index beside it (an unfinished build-triplets output?)")
        for row in read_index(index_url).select(["key", "status"]).to_pylist():
            if row["status"] != "ok":
                continue
            digest.update(row["key"].encode())
            if is_val(row["key"], val_fraction):
                val += 1
            else:
                train += 1
    if train == 0:
        raise TrainingDataError(f"no training samples in {url} (all rejected or held out for validation)")
    first = next(iter(iter_tar_samples(tars[0])), None)
    if first is None:
        raise TrainingDataError(f"the first shard {tars[0]} holds no sample")
    fields = check_fields(set(first) - {"__key__"}, stage, url)
    return DataPlan(tuple(tars), train, val, fields, workers, digest.hexdigest()[:16])


def check_fields(files: set[str], stage: str, url: str) -> Fields:
    """The stage's needs against the files of a sample; TrainingDataError naming what is missing."""
    needs = STAGE_NEEDS[stage]
    missing = []
    if "latents.npy" not in files and "src.jpg" not in files:
        missing.append("src.jpg or latents.npy")
    if "depth" in needs:
        missing += [f for f in ("depth_fg.png", "depth_bg.png") if f not in files]
    clip = {"clip_fg.npy", "clip_bg.npy"} <= files
    if "exemplars" in needs:
        if "mask.png" not in files:
            missing.append("mask.png")
        if not clip and not {"fg.png", "bg.jpg"} <= files:
            missing.append("clip_fg.npy + clip_bg.npy (or fg.png + bg.jpg to embed)")
    if missing:
        raise TrainingDataError(f"triplet shards at {url} lack {', '.join(missing)} needed by stage {stage!r}")
    return Fields(depth="depth" in needs, exemplars="exemplars" in needs, latents="latents.npy" in files, clip=clip)


# ------------------------------------------------------------------------------------ decoding


def _open_image(data: bytes, what: str) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    if max(image.size) > MAX_SIDE:
        raise ValueError(f"{what}: {image.size} exceeds {MAX_SIDE} px")
    return image


def _resized(image: PIL.Image.Image, resolution: int | None, resample: int) -> PIL.Image.Image:
    if resolution is None or image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), resample)


def _npy(data: bytes, what: str) -> np.ndarray:
    if len(data) > MAX_NPY_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes exceeds the cap")
    return decode_npy(data)


def _depth(data: bytes, resolution: int | None) -> np.ndarray:
    _open_image(data, "depth map")  # header only: the size cap before decoding
    d = decode_depth_png16(data)
    if resolution is not None and d.shape != (resolution, resolution):
        d = np.asarray(PIL.Image.fromarray(d, mode="F").resize((resolution, resolution), PIL.Image.BILINEAR))
    return d[None].astype(np.float32)


def decode_sample(files: dict[str, Any], fields: Fields, resolution: int | None) -> dict[str, Any]:
    """One sample's files (extension -> bytes) -> the row the trainer reads."""
    key = files["__key__"]
    caption = files.get("txt") or b""
    row: dict[str, Any] = {"key": key, "caption": caption.decode("utf-8") if isinstance(caption, bytes) else caption}
    if fields.latents:
        row["latents"] = _npy(files["latents.npy"], f"{key} latents").astype(np.float32)
    else:
        src = _resized(_open_image(files["src.jpg"], key).convert("RGB"), resolution, PIL.Image.BICUBIC)
        row["pixels"] = (np.asarray(src, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    if fields.depth:
        row["fg_depth"] = _depth(files["depth_fg.png"], resolution)
        row["bg_depth"] = _depth(files["depth_bg.png"], resolution)
    if fields.exemplars:
        mask = _resized(_open_image(files["mask.png"], key).convert("L"), resolution, PIL.Image.NEAREST)
        row["mask"] = (np.asarray(mask) > 127).astype(np.float32)[None]
        if fields.clip:
            row["clip_fg"] = _npy(files["clip_fg.npy"], key).astype(np.float32).reshape(-1)
            row["clip_bg"] = _npy(files["clip_bg.npy"], key).astype(np.float32).reshape(-1)
        else:
            row["fg_image"] = np.asarray(_open_image(files["fg.png"], key).convert("RGB"))
            row["bg_image"] = np.asarray(_open_image(files["bg.jpg"], key).convert("RGB"))
    return row


def safe_decode(files: dict[str, Any], fields: Fields, resolution: int | None) -> dict[str, Any] | None:
    """:func:`decode_sample`, or None (logged with the key and reason) for a sample that cannot be
    decoded: training goes on without it instead of failing on one bad file."""
    try:
        return decode_sample(files, fields, resolution)
    except (ValueError, OSError, KeyError, SyntaxError) as exc:  # PIL raises SyntaxError on some bad PNGs
        log.warning("skipping training sample %s: %s", files.get("__key__"), exc)
        return None


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    if not rows:
        return {}
    return {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray) else np.asarray([r[k] for r in rows])
            for k in rows[0]}


class DecodeBatch:
    """Ray Data ``map_batches`` function: keep the split's rows, decode them."""

    def __init__(self, fields: Fields, resolution: int | None, val_fraction: float, split: str) -> None:
        self.fields, self.resolution, self.val_fraction, self.split = fields, resolution, val_fraction, split

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i in range(len(batch["__key__"])):
            key = str(batch["__key__"][i])
            if is_val(key, self.val_fraction) != (self.split == "val"):
                continue
            files = {k: batch[k][i] for k in batch if not k.startswith("__url")}
            row = safe_decode({**files, "__key__": key}, self.fields, self.resolution)
            if row is not None:
                rows.append(row)
        out = stack_rows(rows)
        return out  # {} when the block holds no row of this split (an empty block)


def ray_read_args(url: str) -> tuple[list[str] | str, Any]:
    """(paths, filesystem) for Ray readers: ``s3://`` goes through s3fs (custom endpoints work)."""
    fs, path = storage.get_fs(url)
    proto = storage.protocol_of(fs)
    if proto in ("file", "local"):
        return path, None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def ray_datasets(plan: DataPlan, resolution: int | None, val_fraction: float, num_cpus: float = 1.0
                 ) -> dict[str, Any]:
    """Ray Datasets ``train`` (padded to an even split) and, when it has rows, ``val``."""
    import ray

    paths, filesystem = zip(*(ray_read_args(u) for u in plan.tar_urls))
    fs = filesystem[0]

    def read(split: str):
        ds = ray.data.read_webdataset(list(paths), filesystem=fs, decoder=None, file_extensions=["tar"],
                                      override_num_blocks=len(paths), num_cpus=num_cpus)
        return ds.map_batches(DecodeBatch(plan.fields, resolution, val_fraction, split), batch_size=16,
                              batch_format="numpy", num_cpus=num_cpus)

    train = read("train")
    if plan.pad:
        train = train.union(read("train").limit(plan.pad))
    out = {"train": train}
    if plan.val_keys:
        out["val"] = read("val")
    return out


def local_rows(plan: DataPlan, resolution: int | None, val_fraction: float, split: str) -> Iterator[dict[str, Any]]:
    """The split's decoded rows in shard order, streamed (the in-process executor's reader)."""
    for tar in plan.tar_urls:
        for files in iter_tar_samples(tar):
            if is_val(files["__key__"], val_fraction) == (split == "val"):
                row = safe_decode(files, plan.fields, resolution)
                if row is not None:
                    yield row


def shuffled(rows: Iterable[dict[str, Any]], buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    """A seeded shuffle buffer (bounded memory), like Ray Data's local shuffle."""
    rng = random.Random(seed)
    pool: list[dict[str, Any]] = []
    for row in rows:
        pool.append(row)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def batched(rows: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, np.ndarray]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield stack_rows(chunk)
            chunk = []
    if chunk:
        yield stack_rows(chunk)


def to_cnc_batch(batch: dict[str, np.ndarray], device: torch.device, embed_images=None) -> CnCBatch:
    """Numpy columns -> :class:`CnCBatch` on ``device``; ``embed_images(list of HxWx3) -> (B, D)``
    embeds fg/bg exemplars when the shards hold no CLIP embeddings."""
    t = lambda name: torch.from_numpy(np.ascontiguousarray(batch[name])).to(device)  # noqa: E731
    out = CnCBatch(captions=[str(c) for c in batch["caption"]])
    if "latents" in batch:
        out.latents = t("latents")
    else:
        out.images = t("pixels")
    if "fg_depth" in batch:
        out.fg_depth, out.bg_depth = t("fg_depth").expand(-1, 3, -1, -1), t("bg_depth").expand(-1, 3, -1, -1)
    if "mask" in batch:
        out.mask = t("mask")
        if "clip_fg" in batch:
            out.fg_embeds, out.bg_embeds = t("clip_fg"), t("clip_bg")
        else:
            out.fg_embeds = embed_images(list(batch["fg_image"])).to(device)
            out.bg_embeds = embed_images(list(batch["bg_image"])).to(device)
    return out
