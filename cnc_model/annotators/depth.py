"""Monocular depth for CnC triplets: a DPT / MiDaS model (transformers' ``DPTForDepthEstimation``).

What the maps mean: MiDaS-trained DPT models predict *relative inverse depth* (disparity up to an
unknown scale and shift): larger is nearer. :meth:`DepthEstimator.predict` keeps that convention and
normalises each map to [0, 1] on its own (``(d - min) / (max - min)``; a constant map becomes all
zeros), so 1 is the nearest pixel of that image and 0 the farthest. This is the form CnC feeds its
local fuser, as a 3-channel image (:func:`depth_to_rgb`). On disk a map is a 16-bit grayscale PNG
(:func:`encode_depth_png16`, value = round(d * 65535)).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import transformers
from transformers import DPTConfig, DPTForDepthEstimation

# transformers >= 4.56 names the load dtype ``dtype``; older releases ``torch_dtype``
DTYPE_KW = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"

PREPROCESSOR_NAME = "preprocessor_config.json"
MAX_UINT16 = 65535
PREPROCESSING = ("official", "processor")
"""``official``: the CnC reference's MiDaS call (``utils/primitives.py`` ``GetDepthMap``): the image
in [0, 1] at 512 px, no mean/std. ``processor``: the model folder's ``preprocessor_config.json``
(384 px, mean = std = 0.5 for the Intel DPT checkpoints)."""
OFFICIAL_INPUT_SIZE = 512


class DepthEstimator:
    """Batched depth: ``predict(images) -> (B, H, W) float32 in [0, 1]`` at each input's own size.

    Pre-processing happens in torch (resize to the model's input size, scale to [0, 1], then, when
    ``normalize``, subtract the mean and divide by the std). :meth:`from_pretrained` chooses the
    rule (:data:`PREPROCESSING`): ``official`` (default) feeds [0, 1] images at 512 px as the CnC
    reference's MiDaS call does; ``processor`` reads ``preprocessor_config.json``.
    """

    def __init__(self, model: DPTForDepthEstimation, input_size: int | tuple[int, int] | None = None,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 normalize: bool = True):
        self.model = model.eval()
        self.normalize = normalize
        size = input_size or model.config.image_size
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, device: str | None = None,
                        torch_dtype: torch.dtype | None = None, preprocessing: str = "official",
                        **kwargs) -> "DepthEstimator":
        """Load a DPT depth model (hub id such as ``Intel/dpt-large`` or a local folder).

        ``preprocessing``: ``official`` ([0, 1] at 512 px, the CnC reference) or ``processor`` (the
        folder's processor config). fp16 on CUDA unless ``torch_dtype`` says otherwise."""
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch_dtype is None:
            torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model = DPTForDepthEstimation.from_pretrained(model_id_or_path, **{DTYPE_KW: torch_dtype}, **kwargs)
        if preprocessing == "official":
            return cls(model.to(device), OFFICIAL_INPUT_SIZE, normalize=False)
        pre = _read_preprocessor(model_id_or_path, kwargs)
        size = pre.get("size")
        if isinstance(size, dict):
            size = (size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge")))
        return cls(model.to(device), size, pre.get("image_mean", (0.5,) * 3), pre.get("image_std", (0.5,) * 3))

    @classmethod
    def tiny(cls, seed: int = 0, device: str | None = None) -> "DepthEstimator":
        """Seeded tiny DPT (ViT with 4 layers of width 32, 32 px input): milliseconds on a CPU."""
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(tiny_dpt_config())
        return cls(model.to(device or "cpu"))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model (safetensors) and a ``preprocessor_config.json`` with size, mean and std."""
        self.model.save_pretrained(path, safe_serialization=True)
        pre = {"image_processor_type": "DPTImageProcessor", "do_resize": True, "do_normalize": True,
               "do_rescale": True, "rescale_factor": 1 / 255,
               "size": {"height": self.input_size[0], "width": self.input_size[1]},
               "image_mean": list(self.image_mean), "image_std": list(self.image_std)}
        (Path(path) / PREPROCESSOR_NAME).write_text(json.dumps(pre, indent=2))

    # ---------------------------------------------------------------------------- predicting

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 images (same size) -> normalised (B, 3, h, w) model input."""
        x = torch.from_numpy(np.stack([np.asarray(im)[..., :3] for im in images])).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if not self.normalize:
            return x.to(self.device, self.dtype)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device, self.dtype)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Relative inverse depth of each image, resized to the images' size, normalised to [0, 1] per image."""
        if not len(images):
            return np.zeros((0, 0, 0), np.float32)
        h, w = np.asarray(images[0]).shape[:2]
        raw = self.model(pixel_values=self.preprocess(images)).predicted_depth  # (B, h', w')
        raw = F.interpolate(raw[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)[:, 0]
        return normalize_per_image(raw.cpu().numpy())


def tiny_dpt_config() -> DPTConfig:
    """A DPT with the real architecture (ViT + reassemble + fusion + depth head) at toy widths."""
    return DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=4, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=(8, 16, 32, 32),
        fusion_hidden_size=16, head_in_index=-1, use_auxiliary_head=False, reassemble_factors=(4, 2, 1, 0.5),
    )


def _read_preprocessor(model_id_or_path: str | os.PathLike, kwargs: dict) -> dict:
    local = Path(model_id_or_path) / PREPROCESSOR_NAME
    if local.is_file():
        return json.loads(local.read_text())
    try:  # a hub id: the processor config sits beside the weights (cached or downloaded)
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(model_id_or_path), PREPROCESSOR_NAME, revision=kwargs.get("revision"))
        return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - fall back to the DPT defaults
        return {}


def normalize_per_image(depth: np.ndarray) -> np.ndarray:
    """(B, H, W) -> float32 in [0, 1], each map min-max scaled on its own; constant or non-finite maps -> 0."""
    d = np.nan_to_num(depth.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo = d.min(axis=(1, 2), keepdims=True)
    span = d.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 1e-12, (d - lo) / np.where(span > 1e-12, span, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def encode_depth_png16(depth: np.ndarray, compress_level: int = 1) -> bytes:
    """[0, 1] HxW map -> 16-bit grayscale PNG bytes (value = round(d * 65535)).

    Level 1 zlib: ~2.6x faster than the default 6 on 512² maps for a slightly larger file."""
    arr = np.clip(np.rint(np.asarray(depth, np.float64) * MAX_UINT16), 0, MAX_UINT16).astype(np.uint16)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_depth_png16(data: bytes) -> np.ndarray:
    """16-bit PNG bytes -> HxW float32 in [0, 1]."""
    arr = np.asarray(PIL.Image.open(io.BytesIO(data)))
    if arr.dtype != np.uint16:
        raise ValueError(f"not a 16-bit depth PNG (dtype {arr.dtype})")
    return arr.astype(np.float32) / MAX_UINT16


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    """A [0, 1] map (or a uint16 one) as the HxWx3 uint8 image the CnC local fuser takes."""
    d = np.asarray(depth)
    if d.dtype == np.uint16:
        d = d.astype(np.float32) / MAX_UINT16
    g = np.clip(np.rint(d * 255), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)
