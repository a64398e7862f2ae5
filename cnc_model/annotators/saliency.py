"""Salient-object masks for sources without labels (Pick-a-Pic): U2-Net probabilities, thresholded.

Two pre/post-processing rules (``preprocessing=``):

* ``"official"`` (default): the CnC reference's ``GetSODMask`` (``utils/primitives.py``): the image
  in [0, 1] resized bilinearly to 320² (no normalisation), the fused sigmoid output thresholded at
  0.5, and that binary map resized bilinearly back to the input size (soft edges).
* ``"u2net_test"``: the public U2-Net test script: divide by the image's maximum, ImageNet
  mean/std, min-max normalise the fused output per image, resize back.

:meth:`SaliencyModel.masks` thresholds :meth:`SaliencyModel.probabilities` to a strictly binary
{0, 255} mask.
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
PREPROCESSING = ("official", "u2net_test")


class SaliencyModel:
    """``probabilities(images) -> (B, H, W) float32 in [0, 1]``; ``masks(images) -> (B, H, W) uint8 {0, 255}``."""

    def __init__(self, model: U2Net, input_size: int = 320, threshold: float = 0.5, device: str | None = None,
                 preprocessing: str = "official"):
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
        self.preprocessing = preprocessing
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
        """HxWx3 uint8 images (same size) -> the model input under :attr:`preprocessing`."""
        x = torch.from_numpy(np.stack([np.asarray(im)[..., :3] for im in images])).permute(0, 3, 1, 2).float()
        return self.preprocess_tensor(x / 255.0)

    def preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> the model input under :attr:`preprocessing`."""
        size = (self.input_size, self.input_size)
        if self.preprocessing == "official":  # GetSODMask: bilinear, no antialias, no normalisation
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            return x.to(self.device)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
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
        x = torch.from_numpy(np.stack([np.asarray(im)[..., :3] for im in images])).permute(0, 3, 1, 2).float()
        return self.probabilities_tensor(x / 255.0)[:, 0].cpu().numpy()

    @torch.no_grad()
    def probabilities_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, 1, H, W)`` float in [0, 1] at the same size.

        ``official``: the binary (> 0.5) U2-Net map resized bilinearly, so edges are soft;
        ``u2net_test``: the min-max normalised fused map."""
        h, w = x.shape[-2:]
        fused = self.model(self.preprocess_tensor(x.float()))[0].float()  # (B, 1, s, s)
        if self.preprocessing == "official":
            fused = (fused.clamp(0, 1) > 0.5).float()
            return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        lo = fused.amin(dim=(1, 2, 3), keepdim=True)
        span = fused.amax(dim=(1, 2, 3), keepdim=True) - lo
        fused = torch.where(span > 1e-8, (fused - lo) / span.clamp_min(1e-8), torch.zeros_like(fused))
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)

    def masks(self, images: Sequence[np.ndarray], threshold: float | None = None) -> np.ndarray:
        """Binary masks: 255 where the probability exceeds the threshold, else 0."""
        return binarize(self.probabilities(images), self.threshold if threshold is None else threshold)


def binarize(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities -> uint8 {0, 255} (strictly greater than the threshold is foreground)."""
    return np.where(np.asarray(prob) > threshold, 255, 0).astype(np.uint8)
