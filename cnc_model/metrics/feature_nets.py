"""Feature networks for FID and the Inception Score: images in, pool features and logits out.

A feature net is a callable taking a ``(B, 3, H, W)`` uint8 tensor and returning
``{"pool": (B, D), "logits": (B, C)}``. The real one is the standard FID Inception v3 (the
pt_inception / torch-fidelity weights file, loaded from a local path); the tiny one is a seeded
random conv net for tests and demos, whose numbers are plumbing, not FID. Both resize the way the
published FID does: bilinear, without antialiasing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""The torch-fidelity / torchmetrics name of the FID Inception v3 weights (pt_inception)."""
TINY = "tiny"


class FeatureNet(Protocol):
    num_features: int
    num_classes: int

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TinyFeatureNet(nn.Module):
    """Seeded random conv net (32 px, 16 features, 10 classes): exercises the FID/IS code path."""

    def __init__(self, seed: int = 0, size: int = 32, num_features: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.size, self.num_features, self.num_classes = size, num_features, num_classes
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, num_features, 3, stride=2, padding=1)
        self.head = nn.Linear(num_features, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _check_uint8(images).float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - 128.0) / 128.0
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "logits": self.head(pool)}


class InceptionFeatureNet(nn.Module):
    """The FID Inception v3 (torchmetrics' ``NoTrainInceptionV3``, torch-fidelity's graph) with
    the TF1-compatible bilinear resize to 299 px (no antialias): 2048 pool features and the
    1008-way unbiased logits of the Inception Score."""

    num_features, num_classes = 2048, 1008

    def __init__(self, weights_path: str | os.PathLike) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights file {path} not found: download {INCEPTION_WEIGHTS_FILE} (the pt_inception "
                "FID weights of torch-fidelity / torchmetrics) and pass its path"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:  # pragma: no cover - depends on the user's install
            raise ModuleNotFoundError("the Inception feature net needs torchmetrics and torch-fidelity") from exc
        # torch-fidelity unpickles its weights file freely: read it as tensors only first, then hand
        # it a copy holding nothing but those tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / INCEPTION_WEIGHTS_FILE
            torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, clean)
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(clean), antialias=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(_check_uint8(images))
        return {"pool": pool.reshape(pool.shape[0], -1), "logits": logits}


def load_feature_net(name_or_path: str | os.PathLike) -> nn.Module:
    """``"tiny"`` or the path of the Inception weights file (FileNotFoundError naming it)."""
    if str(name_or_path) == TINY:
        return TinyFeatureNet()
    return InceptionFeatureNet(name_or_path)


def _check_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"feature nets take (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    return images
