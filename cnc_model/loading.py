"""Get a ready CnC pipeline from a name: ``"tiny"`` (seeded, untrained, offline) or a saved folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cnc_model.cnc.pipeline_cnc import CnCPipeline
from cnc_model.tiny import tiny_clip_image_encoder, tiny_sd_components


def tiny_cnc_pipeline(seed: int = 0) -> CnCPipeline:
    """An untrained CnC pipeline on the tiny SD parts and tiny CLIP image encoder (64 px), with a
    tiny U2-Net attached for the soft-guidance mask."""
    from cnc_model.annotators.saliency import SaliencyModel

    encoder, processor = tiny_clip_image_encoder(seed)
    torch.manual_seed(seed + 100)
    pipe = CnCPipeline.from_sd(tiny_sd_components(seed), image_encoder=encoder, feature_extractor=processor)
    pipe.set_saliency_model(SaliencyModel.tiny(seed, device="cpu"))
    return pipe


def load_pipeline(model: str | os.PathLike, device: str | torch.device | None = None) -> CnCPipeline:
    """``"tiny"`` or a folder written by ``CnCPipeline.save_pretrained``; FileNotFoundError /
    ValueError with the reason otherwise."""
    if str(model) == "tiny":
        pipe = tiny_cnc_pipeline()
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist (use 'tiny' or a saved CnC pipeline folder)")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} has no model_index.json: not a saved diffusers pipeline")
        pipe = CnCPipeline.from_pretrained(path)
    return pipe.to(device) if device is not None else pipe
