"""The per-batch stages of build-triplets, as callable classes for Ray Data ``map_batches``.

Each stage loads its model once in ``__init__(preset, device, **cfg)`` and maps a numpy batch
(a dict of equal-length columns) to a numpy batch. Images travel as encoded bytes in object
columns so blocks stay small. Input columns (from ingest): ``key``, ``source_id``, ``jpg`` (the
source crop), ``txt``, ``mask_png`` (b"" unless the source had labels) and ``reject`` ("" = alive).

    SaliencyStage    mask_png (given labels mask, else U2-Net thresholded), mask_source
    MaskFilterStage  reject blank_image / no_salient_object / object_fills_frame, mask_area
    ForegroundStage  fg_png (= src * mask, lossless), dilated_png, dilation
    InpaintStage     bg_jpg (SD inpainting where dilated_png is set), seed
    DepthStage       depth_fg_png, depth_bg_png (16-bit, [0, 1] inverse depth per image)
    ClipStage        clip_fg_npy, clip_bg_npy (optional)

A row whose ``reject`` is set passes through a later stage untouched; that stage's new byte
columns are b"" for it (numbers 0). Models run in micro-batches of ``batch_size`` rows; a short
micro-batch is padded to ``batch_size`` by repeating its last image (``pad_batches=True``), so every
model call has the same shape and a sample's result does not depend on which samples share its
batch (with a fixed device and thread count the outputs are then bit-identical; unpadded, batch
size changes the floating-point rounding).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tasks.triplets import masks as M
from tasks.triplets.config import INPAINT_STEPS

REJECT_CORRUPT = "corrupt_image"
REJECT_BLANK = "blank_image"
REJECT_NO_OBJECT = "no_salient_object"
REJECT_FILLS_FRAME = "object_fills_frame"
REJECT_BAD_MASK = "mask_size_mismatch"


def _preset(name: str):
    from cnc_model.presets import get_preset

    return get_preset(name)


def _bytes_column(n: int) -> np.ndarray:
    col = np.empty(n, dtype=object)
    col[:] = [b""] * n
    return col


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, np.ndarray):  # a binary value that came back as a uint8 array
        return value.tobytes()
    raise TypeError(f"expected bytes, got {type(value).__name__}")


def run_micro_batches(fn: Callable[[list], Sequence], items: list, batch_size: int, pad: bool = True) -> list:
    """``fn`` over ``items`` in chunks of ``batch_size``; short chunks padded by repeating their last item
    (results for the padding dropped), so every call sees the same batch shape."""
    out: list = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        n = len(chunk)
        if pad and n < batch_size:
            chunk = chunk + [chunk[-1]] * (batch_size - n)
        out.extend(list(fn(chunk))[:n])
    return out


def _by_shape(indices: list[int], arrays: dict[int, np.ndarray]) -> list[list[int]]:
    """Group row indices by image shape (a model call needs one size)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(arrays[i].shape, []).append(i)
    return list(groups.values())


class Stage:
    """Common frame: pass rejects through, fill this stage's columns, count rows and rejects."""

    name = "stage"
    has_model = False  # numpy-only stages run inside the next model stage's actors
    byte_outputs: tuple[str, ...] = ()
    str_outputs: tuple[str, ...] = ()
    number_outputs: dict[str, type] = {}

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True):
        self.preset = _preset(preset)
        self.device = device
        self.batch_size = int(batch_size)
        self.pad_batches = pad_batches
        self.counters: Counter[str] = Counter()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        n = len(batch["key"])
        out = dict(batch)
        reject = np.empty(n, dtype=object)
        reject[:] = [str(r) if r is not None else "" for r in batch["reject"]]
        for c in self.byte_outputs:
            out[c] = _bytes_column(n)
        for c in self.str_outputs:
            out[c] = np.empty(n, dtype=object)
            out[c][:] = [""] * n
        for c, t in self.number_outputs.items():
            out[c] = np.zeros(n, dtype=t)
        live = [i for i in range(n) if not reject[i]]
        if live:
            self.process(batch, live, out, reject)
        out["reject"] = reject
        new_rejects = [str(reject[i]) for i in live if reject[i]]
        self.counters["rows"] += n
        self.counters["passed_through"] += n - len(live)
        self.counters["processed"] += len(live) - len(new_rejects)
        for r in new_rejects:
            self.counters[f"reject:{r}"] += 1
        self.counters["batches"] += 1
        self.counters["seconds"] += time.perf_counter() - t0
        return out

    def process(self, batch: dict[str, np.ndarray], live: list[int], out: dict[str, np.ndarray],
                reject: np.ndarray) -> None:
        raise NotImplementedError

    def micro(self, fn: Callable[[list], Sequence], items: list) -> list:
        self.counters["model_calls"] += -(-len(items) // self.batch_size)
        return run_micro_batches(fn, items, self.batch_size, self.pad_batches)

    def stats(self) -> dict[str, float]:
        """Counters so far: rows, passed_through, processed, reject:<reason>, batches, model_calls, seconds."""
        return dict(self.counters)

    def _decode_images(self, batch: dict, col: str, rows: list[int], reject: np.ndarray) -> dict[int, np.ndarray]:
        images = {}
        for i in rows:
            try:
                images[i] = M.decode_image(_as_bytes(batch[col][i]))
            except Exception:  # noqa: BLE001 - any undecodable input becomes a reject, not a crash
                reject[i] = REJECT_CORRUPT
        return images


class SaliencyStage(Stage):
    """The object mask M: the ingest's labels mask when the row has one, else U2-Net thresholded.

    cfg: ``threshold`` (0.5, on the min-max normalised U2-Net map), ``model`` (path overriding the
    preset), ``input_size`` (320 for real weights, 64 tiny), ``use_given_masks`` (True), ``seed`` (tiny).
    """

    name = "saliency"
    has_model = True
    str_outputs = ("mask_source",)

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True, threshold: float = 0.5, model: str | None = None,
                 input_size: int | None = None, use_given_masks: bool = True, seed: int = 0):
        super().__init__(preset, device, batch_size, pad_batches)
        from cnc_model.annotators.saliency import SaliencyModel

        self.use_given_masks = use_given_masks
        kw = {"threshold": threshold}
        if input_size:
            kw["input_size"] = input_size
        if model is None and self.preset.is_tiny:
            self.model = SaliencyModel.tiny(seed, device=device, **kw)
        else:
            self.model = SaliencyModel.from_pretrained(model or self.preset.saliency, device=device, **kw)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        masks = np.empty(n, dtype=object)  # mask_png is read and written: work on a copy
        masks[:] = [_as_bytes(m) for m in batch["mask_png"]] if "mask_png" in batch else [b""] * n
        return super().__call__({**batch, "mask_png": masks})

    def process(self, batch, live, out, reject):
        masks, source = out["mask_png"], out["mask_source"]
        todo = []
        for i in live:
            given = _as_bytes(batch["mask_png"][i])
            if given and self.use_given_masks:
                try:
                    masks[i] = M.encode_png(M.decode_mask(given))
                    source[i] = "labels"
                except Exception:  # noqa: BLE001
                    reject[i] = REJECT_CORRUPT
            else:
                todo.append(i)
        images = self._decode_images(batch, "jpg", todo, reject)
        for group in _by_shape([i for i in todo if i in images], images):
            pred = self.micro(lambda idx: self.model.masks([images[j] for j in idx]), group)
            for i, m in zip(group, pred):
                masks[i] = M.encode_png(m)
                source[i] = "u2net"
        for i in live:
            if reject[i]:
                masks[i] = b""


class MaskFilterStage(Stage):
    """Rejects rows without a usable object: a blank (flat) image, an object smaller than
    ``min_area`` or larger than ``max_area`` (fractions of the frame). Adds ``mask_area``."""

    name = "mask_filter"
    number_outputs = {"mask_area": np.float64}

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True, min_area: float = 0.01, max_area: float = 0.85,
                 blank_tolerance: int = 8):
        super().__init__(preset, device, batch_size, pad_batches)
        self.min_area, self.max_area, self.blank_tolerance = min_area, max_area, blank_tolerance

    def process(self, batch, live, out, reject):
        images = self._decode_images(batch, "jpg", live, reject)
        for i in images:
            if M.is_blank(images[i], self.blank_tolerance):
                reject[i] = REJECT_BLANK
                continue
            data = _as_bytes(batch["mask_png"][i])
            try:
                mask = M.decode_mask(data)
            except Exception:  # noqa: BLE001
                reject[i] = REJECT_CORRUPT
                continue
            if mask.shape != images[i].shape[:2]:
                reject[i] = REJECT_BAD_MASK
                continue
            area = M.area_fraction(mask)
            out["mask_area"][i] = area
            if area < self.min_area:
                reject[i] = REJECT_NO_OBJECT
            elif area > self.max_area:
                reject[i] = REJECT_FILLS_FRAME


class ForegroundStage(Stage):
    """I_f = I_s * M (lossless PNG) and the dilated mask M_d that the inpainter removes.

    cfg: ``dilation_at_512`` (50: the square's side at 512², scaled with the image's shorter side)."""

    name = "foreground"
    byte_outputs = ("fg_png", "dilated_png")
    number_outputs = {"dilation": np.int64}

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True, dilation_at_512: int = M.DILATION_AT_512):
        super().__init__(preset, device, batch_size, pad_batches)
        self.dilation_at_512 = dilation_at_512

    def process(self, batch, live, out, reject):
        images = self._decode_images(batch, "jpg", live, reject)
        for i, src in images.items():
            mask = M.decode_mask(_as_bytes(batch["mask_png"][i]))
            k = M.dilation_size(*mask.shape, at_512=self.dilation_at_512)
            out["fg_png"][i] = M.encode_png(M.foreground(src, mask))
            out["dilated_png"][i] = M.encode_png(M.dilate(mask, k))
            out["dilation"][i] = k


class InpaintStage(Stage):
    """I_b: SD inpainting of I_s where the dilated mask is set, one seeded generator per sample key.

    cfg: ``num_inference_steps`` (25), ``guidance_scale`` (10), ``strength`` (1), ``prompt``,
    ``negative_prompt``, ``paste_unmasked`` (False: keep the pipeline's whole output; see
    docs/triplets.md), ``jpeg_quality`` (95), ``model`` (overrides the preset), ``seed`` (tiny weights).
    Adds ``seed`` (the generator seed of each sample). Default micro-batch 4.
    """

    name = "inpaint"
    has_model = True
    byte_outputs = ("bg_jpg",)
    number_outputs = {"seed": np.int64}

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 4,
                 pad_batches: bool = True, num_inference_steps: int = INPAINT_STEPS, guidance_scale: float = 10.0,
                 strength: float = 1.0, prompt: str | None = None, negative_prompt: str | None = None,
                 paste_unmasked: bool = False, jpeg_quality: int = 95, model: str | None = None, seed: int = 0):
        super().__init__(preset, device, batch_size, pad_batches)
        from cnc_model.annotators.inpaint import NEGATIVE_PROMPT, PROMPT, Inpainter, InpaintSettings

        settings = InpaintSettings(prompt or PROMPT, NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
                                   strength, guidance_scale, num_inference_steps)
        if model is None and self.preset.is_tiny:
            self.inpainter = Inpainter.tiny(seed, device=device, settings=settings)
        else:
            self.inpainter = Inpainter.from_pretrained(model or self.preset.sd_inpaint, device=device,
                                                       settings=settings)
        self.paste_unmasked = paste_unmasked
        self.jpeg_quality = jpeg_quality

    def process(self, batch, live, out, reject):
        from cnc_model.annotators.inpaint import seed_from_key

        images = self._decode_images(batch, "jpg", live, reject)
        dilated = {i: M.decode_mask(_as_bytes(batch["dilated_png"][i])) for i in images}
        keys = {i: str(batch["key"][i]) for i in images}
        for group in _by_shape(list(images), images):
            def call(idx: list[int]) -> list[np.ndarray]:
                return _inpaint_any_size(self.inpainter, [images[j] for j in idx], [dilated[j] for j in idx],
                                         [keys[j] for j in idx])

            results = self.micro(call, group)
            for i, bg in zip(group, results):
                if self.paste_unmasked:
                    bg = M.paste_unmasked(bg, images[i], dilated[i])
                out["bg_jpg"][i] = M.encode_jpg(bg, self.jpeg_quality)
                out["seed"][i] = seed_from_key(keys[i])


def _inpaint_any_size(inpainter, images: list[np.ndarray], masks: list[np.ndarray], keys: list[str]) -> list:
    """SD needs sides divisible by 8: other sizes are resized to the nearest such size and back."""
    import PIL.Image

    h, w = images[0].shape[:2]
    h8, w8 = max(8, round(h / 8) * 8), max(8, round(w / 8) * 8)
    if (h8, w8) == (h, w):
        return inpainter.inpaint(images, masks, keys)

    def resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
        return np.asarray(PIL.Image.fromarray(a).resize((size[1], size[0]), resample))

    bicubic, nearest = PIL.Image.Resampling.BICUBIC, PIL.Image.Resampling.NEAREST
    res = inpainter.inpaint([resize(a, (h8, w8), bicubic) for a in images],
                            [resize(m, (h8, w8), nearest) for m in masks], keys)
    return [resize(r, (h, w), bicubic) for r in res]


class DepthStage(Stage):
    """Depth of I_f and I_b: relative inverse depth normalised to [0, 1] per image, 16-bit PNG.

    cfg: ``model`` (overrides the preset), ``compress_level`` (1), ``seed`` (tiny weights)."""

    name = "depth"
    has_model = True
    byte_outputs = ("depth_fg_png", "depth_bg_png")

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True, model: str | None = None, compress_level: int = 1, seed: int = 0):
        super().__init__(preset, device, batch_size, pad_batches)
        from cnc_model.annotators.depth import DepthEstimator

        if model is None and self.preset.is_tiny:
            self.estimator = DepthEstimator.tiny(seed, device=device)
        else:
            self.estimator = DepthEstimator.from_pretrained(model or self.preset.depth, device=device)
        self.compress_level = compress_level

    def process(self, batch, live, out, reject):
        from cnc_model.annotators.depth import encode_depth_png16

        fg = self._decode_images(batch, "fg_png", live, reject)
        bg = self._decode_images(batch, "bg_jpg", [i for i in live if i in fg], reject)
        # fg and bg maps of all rows go through the model together: one call shape for both
        items = [("depth_fg_png", i, fg[i]) for i in bg] + [("depth_bg_png", i, bg[i]) for i in bg]
        arrays = {k: it[2] for k, it in enumerate(items)}
        for group in _by_shape(list(arrays), arrays):
            maps = self.micro(lambda idx: self.estimator.predict([arrays[j] for j in idx]), group)
            for k, d in zip(group, maps):
                col, i, _ = items[k]
                out[col][i] = encode_depth_png16(d, self.compress_level)


class ClipStage(Stage):
    """CLIP image embeddings of I_f and I_b (float32 ``.npy``, unnormalised ``image_embeds``).

    cfg: ``model`` (overrides the preset), ``seed`` (tiny weights)."""

    name = "clip"
    has_model = True
    byte_outputs = ("clip_fg_npy", "clip_bg_npy")

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True, model: str | None = None, seed: int = 0):
        super().__init__(preset, device, batch_size, pad_batches)
        from cnc_model.annotators.clip_embed import ClipImageEmbedder

        if model is None and self.preset.is_tiny:
            self.embedder = ClipImageEmbedder.tiny(seed, device=device)
        else:
            self.embedder = ClipImageEmbedder.from_pretrained(model or self.preset.clip_image, device=device)

    def process(self, batch, live, out, reject):
        from cnc_model.annotators.clip_embed import encode_npy

        fg = self._decode_images(batch, "fg_png", live, reject)
        bg = self._decode_images(batch, "bg_jpg", [i for i in live if i in fg], reject)
        items = [("clip_fg_npy", i, fg[i]) for i in bg] + [("clip_bg_npy", i, bg[i]) for i in bg]
        arrays = {k: it[2] for k, it in enumerate(items)}
        # the CLIP processor resizes every image to one size, so all sizes share a call
        emb = self.micro(lambda idx: self.embedder.embed([arrays[j] for j in idx]), list(arrays))
        for (col, i, _), e in zip(items, emb):
            out[col][i] = encode_npy(np.asarray(e, np.float32))


class LatentsStage(Stage):
    """VAE latents of I_s (float16 ``.npy``, shape (4, H/8, W/8), scaled), for fast training.

    cfg: ``model`` (an SD folder or id whose ``vae`` to use; default the preset's ``sd``), ``seed``."""

    name = "latents"
    has_model = True
    byte_outputs = ("latents_npy",)

    def __init__(self, preset: str = "tiny", device: str | None = None, batch_size: int = 8,
                 pad_batches: bool = True, model: str | None = None, seed: int = 0):
        super().__init__(preset, device, batch_size, pad_batches)
        from cnc_model.annotators.latents import LatentEncoder

        if model is None and self.preset.is_tiny:
            self.encoder = LatentEncoder.tiny(seed, device=device)
        else:
            self.encoder = LatentEncoder.from_pretrained(model or self.preset.sd, device=device)

    def process(self, batch, live, out, reject):
        from cnc_model.annotators.clip_embed import encode_npy

        images = self._decode_images(batch, "jpg", live, reject)
        for group in _by_shape(list(images), images):
            latents = self.micro(lambda idx: self.encoder.encode([images[j] for j in idx]), group)
            for i, z in zip(group, latents):
                out["latents_npy"][i] = encode_npy(np.asarray(z))


STAGE_ORDER = ("saliency", "mask_filter", "foreground", "inpaint", "depth", "clip", "latents")
STAGE_CLASSES: dict[str, type[Stage]] = {
    "saliency": SaliencyStage, "mask_filter": MaskFilterStage, "foreground": ForegroundStage,
    "inpaint": InpaintStage, "depth": DepthStage, "clip": ClipStage, "latents": LatentsStage,
}


def stage_names(clip: bool = False, latents: bool = False) -> list[str]:
    """The stages in order; ``clip`` and ``latents`` are optional."""
    return [n for n in STAGE_ORDER if (clip or n != "clip") and (latents or n != "latents")]


def build_stages(preset: str = "tiny", *, clip: bool = False, latents: bool = False, device: str | None = None,
                 stage_cfg: dict[str, dict[str, Any]] | None = None) -> list[Stage]:
    """One instance of every stage in order; ``stage_cfg[name]`` goes to its constructor."""
    stage_cfg = stage_cfg or {}
    names = stage_names(clip, latents)
    unknown = set(stage_cfg) - set(names)
    if unknown:
        raise ValueError(f"unknown stages in stage_cfg: {sorted(unknown)}")
    return [STAGE_CLASSES[n](preset=preset, device=device, **stage_cfg.get(n, {})) for n in names]


def rows_to_batch(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows (dicts) -> a numpy batch with object columns (bytes stay bytes)."""
    batch = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        batch[k] = col
    return batch


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    n = len(batch["key"])
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(n)]


def _fill_defaults(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    base = {"source_id": "", "txt": "", "mask_png": b"", "reject": ""}
    return [{**base, **r} for r in rows]


def run_stages_inline(rows: Sequence[dict[str, Any]], preset: str = "tiny", *, batch_size: int = 8,
                      clip: bool = False, latents: bool = False, device: str | None = None,
                      stage_cfg: dict[str, dict[str, Any]] | None = None,
                      stages: list[Stage] | None = None) -> list[dict[str, Any]]:
    """All stages back to back in this process on batches of ``batch_size`` rows: the
    model-compute bound a distributed run is measured against. Returns the output rows in order."""
    if stages is None:
        stages = build_stages(preset, clip=clip, latents=latents, device=device, stage_cfg=stage_cfg)
    rows = _fill_defaults(rows)
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows_to_batch(rows[start:start + batch_size])
        for stage in stages:
            batch = stage(batch)
        out.extend(batch_to_rows(batch))
    return out


def run_reference(rows: Sequence[dict[str, Any]], preset: str = "tiny", *, clip: bool = False,
                  latents: bool = False, device: str | None = None, stage_cfg: dict[str, dict[str, Any]] | None = None,
                  stages: list[Stage] | None = None) -> list[dict[str, Any]]:
    """The reference approach of the paper's public scripts: each model in turn over the whole set,
    one image at a time (micro-batch 1, no padding). Same models and settings as the stages."""
    if stages is None:
        cfg = {n: {**(stage_cfg or {}).get(n, {}), "batch_size": 1, "pad_batches": False}
               for n in stage_names(clip, latents)}
        stages = build_stages(preset, clip=clip, latents=latents, device=device, stage_cfg=cfg)
    rows = _fill_defaults(rows)
    for stage in stages:
        rows = [batch_to_rows(stage(rows_to_batch([r])))[0] for r in rows]
    return list(rows)
