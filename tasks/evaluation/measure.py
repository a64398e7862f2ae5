"""One shard of images -> its partial statistics (the body of the evaluation actor).

A shard is read as a stream, images are featurised in batches, and only sums leave the worker:
FID's ``n, Σf, Σffᵀ``, the Inception Score's per-split sums (generated sets) and CLIPScore's sum
and count (samples with a prompt). The result is .npz bytes (:mod:`cnc_model.metrics.stats_io`).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from cnc_model.metrics import FrechetStats, InceptionScoreStats, MeanStats, clip_scores, stats_io
from cnc_model.metrics.alignment import load_aligner
from cnc_model.metrics.feature_nets import load_feature_net
from cnc_model.metrics.inception_score import DEFAULT_SPLITS
from tasks.shards import iter_tar_samples

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("png", "jpg", "src.jpg", "jpeg", "webp")
"""Which member of a sample is its image: generated shards (png), ingest (jpg), triplets (src.jpg)."""
MAX_IMAGE_PIXELS = 4096 * 4096


def sample_image(sample: dict[str, Any]) -> bytes | None:
    return next((sample[m] for m in IMAGE_MEMBERS if m in sample), None)


def sample_prompt(sample: dict[str, Any]) -> str | None:
    """The prompt a generated image was made from (its job row), else the caption (``txt``)."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if isinstance(meta, dict) and isinstance(meta.get("prompt"), str):
                return meta["prompt"]
        except ValueError:
            pass
    if "txt" in sample:
        return sample["txt"].decode("utf-8", "replace")
    return None


def sample_row(sample: dict[str, Any]) -> dict[str, Any] | None:
    """The job row stored beside a generated image (its conditions), if any."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def decode_rgb(data: bytes) -> np.ndarray:
    """``(H, W, 3)`` uint8; ValueError for an unreadable or oversized image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
        return np.asarray(image.convert("RGB"))


class ShardMeasurer:
    """Loads the feature net and CLIP once; :meth:`measure` turns a shard into statistics."""

    def __init__(self, feature_net: str = "tiny", clip: str = "tiny", device: str = "cpu", batch_size: int = 16,
                 splits: int = DEFAULT_SPLITS, torch_threads: int | None = None, depth: str | None = None,
                 condition_root: str | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.net = load_feature_net(feature_net).to(device)
        self.aligner = load_aligner(clip, device=device) if clip else None
        self.device, self.batch_size, self.splits = device, batch_size, splits
        self.fidelity = None
        if depth and self.aligner is not None:
            from tasks.evaluation.fidelity import ConditionFidelity

            self.fidelity = ConditionFidelity(depth, self.aligner, condition_root, device)

    def measure(self, tar_url: str, generated: bool) -> dict[str, np.ndarray]:
        """Statistics arrays of one shard (``fid/…``, ``is/…``, ``clip/…``, ``skipped``)."""
        fid = FrechetStats.empty(self.net.num_features)
        inception = InceptionScoreStats.empty(self.net.num_classes, self.splits)
        clip = MeanStats()
        from tasks.evaluation.fidelity import KEYS as FIDELITY_KEYS

        fidelity = {k: MeanStats() for k in FIDELITY_KEYS}
        skipped = 0
        shard = tar_url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for batch in _batches(iter_tar_samples(tar_url), self.batch_size):
            images, keys, prompts, rows = [], [], [], []
            for sample in batch:
                data = sample_image(sample)
                try:
                    if data is None:
                        raise ValueError("no image member")
                    images.append(decode_rgb(data))
                except Exception as exc:  # noqa: BLE001 - an unreadable image is counted, not fatal
                    log.warning("%s/%s: skipped (%s)", shard, sample["__key__"], exc)
                    skipped += 1
                    continue
                keys.append(sample["__key__"])  # unique in a set; the split follows it, not the shard
                prompts.append(sample_prompt(sample))
                rows.append(sample_row(sample))
            if not images:
                continue
            out = self._features(images)
            fid.update(out["pool"])
            if generated:
                inception = inception + InceptionScoreStats.from_logits(out["logits"], keys, self.splits)
            scored = [(img, p) for img, p in zip(images, prompts) if p]
            if generated and self.aligner is not None and scored:
                image_embeds = self.aligner.image_embeds([img for img, _ in scored])
                text_embeds = self.aligner.text_embeds([p for _, p in scored])
                clip = clip + MeanStats.from_values(clip_scores(image_embeds, text_embeds))
            if generated and self.fidelity is not None:
                for img, row in zip(images, rows):
                    for key, value in (self.fidelity.measure(img, row) if row else {}).items():
                        fidelity[key] = fidelity[key] + MeanStats.from_values([value])
        arrays = {**stats_io.prefixed("fid", fid.state()), **stats_io.prefixed("clip", clip.state()),
                  "skipped": np.array(skipped, np.int64)}
        if generated:
            arrays.update(stats_io.prefixed("is", inception.state()))
            for key, stats in fidelity.items():
                arrays.update(stats_io.prefixed(key, stats.state()))
        return arrays

    @torch.no_grad()
    def _features(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Feature-net outputs, images of one size batched together, in input order."""
        pool, logits = [None] * len(images), [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape, []).append(i)
        for idx in by_size.values():
            x = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).contiguous().to(self.device)
            out = self.net(x)
            for j, i in enumerate(idx):
                pool[i], logits[i] = out["pool"][j].cpu(), out["logits"][j].cpu()
        return {"pool": torch.stack(pool), "logits": torch.stack(logits)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data entry: rows of ``tar_url``, ``generated``, ``stats_url`` -> the written stats URLs."""
        from tasks import storage

        written = []
        for tar_url, generated, stats_url in zip(batch["tar_url"], batch["generated"], batch["stats_url"]):
            storage.write_bytes(str(stats_url), stats_io.dump(self.measure(str(tar_url), bool(generated))))
            written.append(str(stats_url))
        return {"stats_url": written}


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
