"""The pipeline a stage starts from, and the stage's exported pipeline folder.

Start: ``tiny`` (seeded, offline), ``sd15`` (SD 1.5 + CLIP ViT-L/14 from the preset, fresh fusers:
the local fuser copied from the UNet, as ControlNet), or a saved ``CnCPipeline`` folder (any fsspec
URL; the previous stage's output). ``init_weights`` then loads an official CnC or Uni-ControlNet
checkpoint into the fusers through :mod:`cnc_model.cnc.convert`. A fuser the stage trains but the
start lacks is created fresh.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator

import torch

from cnc_model.cnc.global_fuser import GlobalFuser
from cnc_model.cnc.local_fuser import LocalFuser
from cnc_model.cnc.pipeline_cnc import CnCPipeline
from tasks import storage
from tasks.training.config import TrainConfig


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local folder with the content of ``url`` (the folder itself when it is local)."""
    fs, path = storage.get_fs(url)
    if storage.protocol_of(fs) in ("file", "local"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cnc-model-") as tmp:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


def check_init(init: str) -> None:
    """ValueError (one line) when ``init`` is neither a preset nor a saved pipeline folder."""
    if init in ("tiny", "sd15"):
        return
    if not storage.exists(storage.join(init, "model_index.json")):
        raise ValueError(f"--init {init!r} is neither tiny, sd15 nor a saved CnC pipeline folder (no model_index.json)")


def start_pipeline(cfg: TrainConfig) -> CnCPipeline:
    """The pipeline ``cfg.stage`` starts from, with both fusers present."""
    if cfg.init == "tiny":
        from cnc_model.loading import tiny_cnc_pipeline

        pipe = tiny_cnc_pipeline()
    elif cfg.init == "sd15":
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from cnc_model.presets import get_preset

        preset = get_preset("sd15")
        sd = StableDiffusionPipeline.from_pretrained(preset.sd, safety_checker=None, requires_safety_checker=False)
        pipe = CnCPipeline.from_sd(sd.components, image_encoder=CLIPVisionModelWithProjection.from_pretrained(
            preset.clip_image), feature_extractor=CLIPImageProcessor.from_pretrained(preset.clip_image))
    else:
        with local_copy(cfg.init) as folder:
            pipe = CnCPipeline.from_pretrained(folder)
    if pipe.local_fuser is None:
        pipe.register_modules(local_fuser=LocalFuser.from_unet(pipe.unet))
    if pipe.global_fuser is None:
        embed = pipe.image_encoder.config.projection_dim if pipe.image_encoder is not None else None
        pipe.register_modules(global_fuser=GlobalFuser.from_unet(pipe.unet, embed))
    if cfg.init_weights:
        load_init_weights(pipe, cfg.init_weights, cfg.from_uni_controlnet)
    return pipe


def load_init_weights(pipe: CnCPipeline, url: str, from_uni_controlnet: bool) -> None:
    """An official CnC (or Uni-ControlNet) checkpoint into the fusers it has keys for."""
    from cnc_model.cnc.convert import convert_cnc_checkpoint, load_cnc_checkpoint, read_checkpoint

    with tempfile.TemporaryDirectory(prefix="cnc-init-") as tmp:
        local = posixpath.join(tmp, posixpath.basename(storage.get_fs(url)[1]))
        with open(local, "wb") as fh:
            fh.write(storage.read_bytes(url))
        state = read_checkpoint(local)  # safetensors, or a .ckpt through the weights-only allow-list
    converted = convert_cnc_checkpoint(state, from_uni_controlnet=from_uni_controlnet)
    load_cnc_checkpoint(state, pipe.local_fuser if converted.local_fuser is not None else None,
                        pipe.global_fuser if converted.global_fuser is not None else None,
                        from_uni_controlnet=from_uni_controlnet)


def export_pipeline(pipe: CnCPipeline, out_url: str) -> str:
    """``save_pretrained`` (safetensors) to ``out_url``/model; published whole or not at all
    (a local folder is renamed into place; object stores publish each file on upload)."""
    model_url = storage.join(out_url, "model")
    fs, path = storage.get_fs(model_url)
    local = storage.protocol_of(fs) in ("file", "local")
    with tempfile.TemporaryDirectory(prefix="cnc-export-", dir=os.path.dirname(path) if local else None) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if local:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.rename(tmp, path)
            os.makedirs(tmp)  # for the context manager's cleanup
        else:
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    return model_url
