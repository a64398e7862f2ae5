"""CLIP image embeddings of I_f and I_b: the exemplar (global) conditions CnC trains with.

Stored unnormalised: ``image_embeds`` of ``CLIPVisionModelWithProjection`` as float32 (768-d for
ViT-L/14); the global fuser normalises as it needs. Precomputing them spares the training job
a CLIP forward per sample and step.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import CLIPVisionModelWithProjection

try:  # transformers >= 5: the PIL backend (the default one needs torchvision)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4.x
    from transformers import CLIPImageProcessor

# transformers >= 4.56 names the load dtype ``dtype``; older releases ``torch_dtype``
DTYPE_KW = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"


class ClipImageEmbedder:
    """``embed(images) -> (B, D) float32`` CLIP image embeddings."""

    def __init__(self, model: CLIPVisionModelWithProjection, processor: CLIPImageProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, device: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "ClipImageEmbedder":
        """Load e.g. ``openai/clip-vit-large-patch14`` or a local folder; fp16 on CUDA by default."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch_dtype is None:
            torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model = CLIPVisionModelWithProjection.from_pretrained(model_id_or_path, **{DTYPE_KW: torch_dtype}, **kwargs)
        processor = CLIPImageProcessor.from_pretrained(model_id_or_path, **kwargs)
        return cls(model.to(device), processor)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | None = None) -> "ClipImageEmbedder":
        from cnc_model.tiny import tiny_clip_image_encoder

        model, processor = tiny_clip_image_encoder(seed)
        return cls(model.to(device or "cpu"), processor)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        pil = [PIL.Image.fromarray(np.asarray(im)[..., :3]) for im in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixels).image_embeds.float().cpu().numpy()


def encode_npy(array: np.ndarray) -> bytes:
    """One array as ``.npy`` bytes (what WebDataset's ``npy`` decoder reads)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
