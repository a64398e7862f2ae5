"""Fixtures for the CnC model tests: tiny seeded models built in-process (no hub, no network)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline

from cnc_model.cnc.pipeline_cnc import CnCPipeline
from cnc_model.tiny import tiny_clip_image_encoder, tiny_sd_components


def make_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Plain diffusers SD on tiny weights, default attention processors: the reference."""
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_cnc_pipeline(seed: int = 0, randomize_zero_convs: bool = False) -> CnCPipeline:
    """Untrained tiny CnC (same SD weights as ``make_sd_pipeline(seed)``) with a tiny U2-Net for
    the mask; optionally with the local fuser's zero convs randomised so that depth actually
    changes the output."""
    from cnc_model.annotators.saliency import SaliencyModel

    encoder, processor = tiny_clip_image_encoder(seed)
    torch.manual_seed(seed + 100)
    pipe = CnCPipeline.from_sd(tiny_sd_components(seed), image_encoder=encoder, feature_extractor=processor)
    pipe.set_saliency_model(SaliencyModel.tiny(seed, device="cpu"))
    if randomize_zero_convs:
        generator = torch.Generator().manual_seed(seed + 7)
        fuser = pipe.local_fuser
        convs = [*fuser.controlnet_down_blocks, fuser.controlnet_mid_block, *fuser.depth_encoder.zero_convs]
        with torch.no_grad():
            for conv in convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(size: tuple[int, int], seed: int) -> PIL.Image.Image:
    """An RGB noise image (width, height)."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def random_depth(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_pipe() -> StableDiffusionPipeline:
    return make_sd_pipeline()


@pytest.fixture(scope="module")
def cnc_pipe() -> CnCPipeline:
    return make_cnc_pipeline()


@pytest.fixture(scope="module")
def trained_like_pipe() -> CnCPipeline:
    return make_cnc_pipeline(randomize_zero_convs=True)
