"""VAE latents of source images, precomputed so that training skips the VAE encoder.

The latent is the mean of the VAE posterior times the VAE's scaling factor (0.18215 for SD 1.5):
deterministic, so a re-run writes the same bytes; training adds its own noise anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL


class LatentEncoder:
    """Images (H, W, 3 uint8) -> scaled VAE latents (4, H/8, W/8) as float16 arrays."""

    def __init__(self, vae: AutoencoderKL, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae = vae.to(self.device).eval()
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, device: str | None = None) -> LatentEncoder:
        """The ``vae`` of a Stable Diffusion folder or hub id (the SD weights CnC trains on)."""
        return cls(AutoencoderKL.from_pretrained(model_id_or_path, subfolder="vae"), device)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | None = None) -> LatentEncoder:
        from cnc_model.tiny import tiny_sd_components

        return cls(tiny_sd_components(seed)["vae"], device)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return (posterior.mean * self.scaling_factor).float().cpu().numpy().astype(np.float16)
