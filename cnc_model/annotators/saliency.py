"""Salient-object masks for sources without labels (Pick-a-Pic): U2-Net probabilities, thresholded.

Pre- and post-processing follow the public U2-Net test script: resize to 320², divide by the
image's maximum, normalise with the ImageNet mean/std, keep the fused output, min-max normalise it
per image and resize it back to the input size. :meth:`SaliencyModel.masks` thresholds that map
to a strictly binary {0, 255} mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cnc_model.annotators.u2net import U2Net, tiny_u2net

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SaliencyModel:
    """``probabilities(images) -> (B, H, W) float32 in [0, 1]``; ``masks(images) -> (B, H, W) uint8 {0, 255}``."""

    def __init__(self, model: U2Net, input_size: int = 320, threshold: float = 0.5, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.input_size = input_size
        self.threshold = threshold

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | None = None, **kwargs) -> "SaliencyModel":
        """From ``u2net.pth`` (the public weights) or a folder written by :meth:`save_pretrained`."""
        return cls(U2Net.from_pretrained(path), device=device, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | None = None, input_size: int = 64, **kwargs) -> "SaliencyModel":
        """Seeded tiny U2-Net at 64 px input."""
        return cls(tiny_u2net(seed), input_size=input_size, device=device, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([np.asarray(im)[..., :3] for im in images])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        peak = x.amax(dim=(1, 2, 3), keepdim=True)
        x = x / torch.where(peak > 0, peak, torch.ones_like(peak))  # an all-black image stays zero
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Per-pixel saliency of each image at its own size (all images of a call share one size)."""
        if not len(images):
            return np.zeros((0, 0, 0), np.float32)
        h, w = np.asarray(images[0]).shape[:2]
        fused = self.model(self.preprocess(images))[0].float()  # (B, 1, s, s)
        lo = fused.amin(dim=(1, 2, 3), keepdim=True)
        span = fused.amax(dim=(1, 2, 3), keepdim=True) - lo
        fused = torch.where(span > 1e-8, (fused - lo) / span.clamp_min(1e-8), torch.zeros_like(fused))
        out = F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return out.clamp(0, 1).cpu().numpy()

    def masks(self, images: Sequence[np.ndarray], threshold: float | None = None) -> np.ndarray:
        """Binary masks: 255 where the probability exceeds the threshold, else 0."""
        return binarize(self.probabilities(images), self.threshold if threshold is None else threshold)


def binarize(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities -> uint8 {0, 255} (strictly greater than the threshold is foreground)."""
    return np.where(np.asarray(prob) > threshold, 255, 0).astype(np.uint8)
