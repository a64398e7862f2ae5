"""Compose and Conquer (CnC) on diffusers: presets, tiny models, local/global fusers, soft guidance, pipeline.

The model classes are exported here because diffusers' pipeline loader imports a component's
class from its top-level package (``model_index.json`` names ``["cnc_model", "LocalFuser"]``).
They load lazily so that ``import cnc_model.presets`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from cnc_model.presets import PRESETS, Preset, get_preset

_LAZY = {
    "CnCPipeline": "cnc_model.cnc.pipeline_cnc",
    "GLoDPipeline": "cnc_model.glod.pipeline_glod",
    "GlobalFuser": "cnc_model.cnc.global_fuser",
    "LocalFuser": "cnc_model.cnc.local_fuser",
    "SoftGuidance": "cnc_model.cnc.soft_guidance",
    "SoftGuidanceAttnProcessor": "cnc_model.cnc.soft_guidance",
}

__all__ = ["PRESETS", "Preset", "get_preset", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnc_model' has no attribute {name!r}")
