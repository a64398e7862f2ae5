"""Convert the official CnC checkpoints (LDM / Uni-ControlNet key layout) to this package's format.

The reference release is one LDM state dict: ``model.diffusion_model.*`` (the frozen SD UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (CLIP text), noise-schedule buffers, and
the two trained parts, ``local_adapter.*`` and ``global_adapter.*``. The SD parts are SD 1.5 as
released (CnC freezes them), so they are skipped here and loaded from the SD 1.5 weights; the
adapters are renamed to :class:`~cnc_model.cnc.local_fuser.LocalFuser` and
:class:`~cnc_model.cnc.global_fuser.GlobalFuser` keys. Any key that fits neither is reported by name.

Key layout of the LDM local adapter (``L`` = ResBlocks per level, ``n`` = levels):
``input_blocks.0.0`` conv_in; ``input_blocks.k`` for ``k = 1 + level*(L+1) + r``: ``r < L`` a
(Local)ResBlock ``.0`` and optionally a SpatialTransformer ``.1``, ``r == L`` a Downsample
``.0.op``; ``zero_convs.k.0``; ``middle_block.{0,1,2}``; ``middle_block_out.0``; ``time_embed.{0,2}``;
``feature_extractor.{fg,bg}_extractor.{0,2,4,6}``, ``.extractors.i.0``, ``.zero_convs.i``.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

LOCAL_PREFIX = "local_adapter."
GLOBAL_PREFIX = "global_adapter."
FROZEN_SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor",
}  # fmt: skip

_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "norm_in": "norm_in",
    "norm_out": "norm_out",
}
_GLOBAL_PARTS = re.compile(r"^(ff1|ff2|norm1|norm2)_(fg|bg)\.(.+)$")


class UnmatchedKeysError(KeyError):
    """Checkpoint keys this converter cannot place (or target keys nothing fills)."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class ConvertedCheckpoint:
    """State dicts for :class:`LocalFuser` / :class:`GlobalFuser` (None if absent) and the keys
    that were skipped on purpose (frozen SD weights, schedule buffers)."""

    local_fuser: dict[str, torch.Tensor] | None
    global_fuser: dict[str, torch.Tensor] | None
    skipped: list[str] = field(default_factory=list)


def _resnet_key(rest: str) -> str | None:
    for old, new in _RESNET_PARTS.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _local_key(key: str, layers_per_block: int) -> str | None:
    """LDM local-adapter key (without prefix) -> LocalFuser key, or None if it does not fit."""
    if m := re.match(r"^time_embed\.(0|2)\.(weight|bias)$", key):
        return f"time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}"
    if m := re.match(r"^input_blocks\.0\.0\.(weight|bias)$", key):
        return f"conv_in.{m[1]}"
    if m := re.match(r"^zero_convs\.(\d+)\.0\.(weight|bias)$", key):
        return f"controlnet_down_blocks.{m[1]}.{m[2]}"
    if m := re.match(r"^middle_block_out\.0\.(weight|bias)$", key):
        return f"controlnet_mid_block.{m[1]}"
    if m := re.match(r"^middle_block\.(\d)\.(.+)$", key):
        index, rest = int(m[1]), m[2]
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        sub = _resnet_key(rest)
        return f"mid_block.resnets.{index // 2}.{sub}" if sub and index in (0, 2) else None
    if m := re.match(r"^input_blocks\.(\d+)\.(\d)\.(.+)$", key):
        k, part, rest = int(m[1]), int(m[2]), m[3]
        level, r = divmod(k - 1, layers_per_block + 1)
        if r == layers_per_block:
            mm = re.match(r"^op\.(weight|bias)$", rest)
            return f"down_blocks.{level}.downsamplers.0.conv.{mm[1]}" if part == 0 and mm else None
        if part == 1:
            return f"down_blocks.{level}.attentions.{r}.{rest}"
        sub = _resnet_key(rest)
        return f"down_blocks.{level}.resnets.{r}.{sub}" if sub else None
    if m := re.match(r"^feature_extractor\.(fg|bg)_extractor\.(\d+)\.(weight|bias)$", key):
        return f"depth_encoder.{m[1]}_stream.{m[2]}.{m[3]}"
    if m := re.match(r"^feature_extractor\.extractors\.(\d+)\.0\.(weight|bias)$", key):
        return f"depth_encoder.extractors.{m[1]}.0.{m[2]}"
    if m := re.match(r"^feature_extractor\.zero_convs\.(\d+)\.(weight|bias)$", key):
        return f"depth_encoder.zero_convs.{m[1]}.{m[2]}"
    return None


def _global_key(key: str) -> str | None:
    m = _GLOBAL_PARTS.match(key)
    return f"{m[2]}_stream.{m[1]}.{m[3]}" if m else None


def infer_layers_per_block(local_keys: list[str]) -> int:
    """ResBlocks per level, from the input-block and extractor counts of a local adapter."""
    blocks = {int(m[1]) for k in local_keys if (m := re.match(r"^input_blocks\.(\d+)\.", k))}
    levels = len({int(m[1]) for k in local_keys if (m := re.match(r"^feature_extractor\.extractors\.(\d+)\.", k))})
    if not blocks or not levels or (max(blocks) + 1) % levels:
        raise UnmatchedKeysError("cannot infer the local adapter's layout from its input_blocks", sorted(local_keys)[:5])
    return (max(blocks) + 1) // levels - 1


def convert_cnc_checkpoint(
    state_dict: dict[str, torch.Tensor], skip_feature_extractor: bool = False
) -> ConvertedCheckpoint:
    """Rename an official CnC (or Uni-ControlNet, with ``skip_feature_extractor=True``: its
    condition encoder differs from CnC's depth streams) state dict. Raises
    :class:`UnmatchedKeysError` naming every key that fits nowhere."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    local_src = {k[len(LOCAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(LOCAL_PREFIX)}
    local: dict[str, torch.Tensor] | None = None
    glob: dict[str, torch.Tensor] | None = None
    skipped, unmatched = [], []
    if local_src:
        layers = infer_layers_per_block(list(local_src)) if not skip_feature_extractor else _layers_from_blocks(local_src)
        local = {}
        for key, value in local_src.items():
            if skip_feature_extractor and key.startswith("feature_extractor."):
                skipped.append(LOCAL_PREFIX + key)
                continue
            new = _local_key(key, layers)
            if new is None:
                unmatched.append(LOCAL_PREFIX + key)
            else:
                local[new] = value
    for key, value in state_dict.items():
        if key.startswith(LOCAL_PREFIX):
            continue
        if key.startswith(GLOBAL_PREFIX):
            new = _global_key(key[len(GLOBAL_PREFIX) :])
            if new is None:
                unmatched.append(key)
            else:
                glob = glob if glob is not None else {}
                glob[new] = value
        elif key.startswith(FROZEN_SD_PREFIXES) or key in SCHEDULE_BUFFERS:
            skipped.append(key)
        else:
            unmatched.append(key)
    if unmatched:
        raise UnmatchedKeysError(
            f"{len(unmatched)} checkpoint key(s) match no CnC parameter: {', '.join(sorted(unmatched))}", sorted(unmatched)
        )
    return ConvertedCheckpoint(local, glob, skipped)


def _layers_from_blocks(local_src: dict[str, torch.Tensor]) -> int:
    """Layers per level without the feature extractor: count the blocks between downsamplers."""
    first_down = min(int(m[1]) for k in local_src if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.", k)))
    return first_down - 1


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str, allow_missing: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` with an error naming missing, unexpected and mis-shaped keys."""
    target = module.state_dict()
    unexpected = sorted(set(state_dict) - set(target))
    missing = sorted(k for k in set(target) - set(state_dict) if not k.startswith(allow_missing))
    shapes = sorted(f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}" for k, v in state_dict.items() if k in target and v.shape != target[k].shape)
    problems = [f"unexpected: {', '.join(unexpected)}" if unexpected else "", f"missing: {', '.join(missing)}" if missing else "",
                f"shape mismatch: {', '.join(shapes)}" if shapes else ""]  # fmt: skip
    problems = [p for p in problems if p]
    if problems:
        raise UnmatchedKeysError(f"{what}: " + "; ".join(problems), unexpected + missing)
    module.load_state_dict(state_dict, strict=not allow_missing)


class _Inert:
    """Stands in for a class a Lightning checkpoint names beside the weights (a callback used as a
    dict key, a hyper-parameter namespace): built with its state as data, no code of it runs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state

    def __hash__(self) -> int:
        return id(type(self))


@functools.lru_cache(maxsize=1)
def _lightning_safe_globals() -> list:
    """The globals (beyond torch's own weights-only set) that PyTorch Lightning checkpoints carry:
    numpy scalars and dtypes in callback states, callback classes as keys, hyper-parameter
    containers. Lightning classes are replaced by inert stand-ins; nothing else unpickles."""
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    entries: list = [np.dtype, argparse.Namespace]
    for name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
        entries.append((scalar, name))  # files written under numpy 1 or 2
    entries += [(type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}")
                for t in ("float64", "float32", "int64", "int32", "bool")]
    for package in ("pytorch_lightning", "lightning.pytorch"):
        for module, cls in (("callbacks.model_checkpoint", "ModelCheckpoint"),
                            ("callbacks.early_stopping", "EarlyStopping"),
                            ("callbacks.lr_monitor", "LearningRateMonitor")):
            entries.append((type(cls, (_Inert,), {}), f"{package}.{module}.{cls}"))  # one stand-in per class
    for name in ("pytorch_lightning.utilities.parsing.AttributeDict", "lightning.fabric.utilities.data.AttributeDict",
                 "lightning_fabric.utilities.data.AttributeDict"):
        entries.append((dict, name))  # hyper-parameters come back as a plain dict
    return entries


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file as a dict, without running code from it: safetensors (by content, any
    extension) first; otherwise ``torch.load(weights_only=True)`` with only the extra globals a
    PyTorch Lightning ``.ckpt`` needs (:func:`_lightning_safe_globals`). Anything else is a
    one-line ValueError naming the global it wanted."""
    import pickle

    path = str(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals(_lightning_safe_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line]
        detail = (after or [line for line in lines if "GLOBAL" in line] or lines or [type(exc).__name__])[0]
        raise ValueError(f"{path}: refused to unpickle ({detail}); only tensors, containers and the "
                         "globals of a Lightning checkpoint load") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict or a Lightning checkpoint")
    return loaded


def load_cnc_checkpoint(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    local_fuser: nn.Module | None = None,
    global_fuser: nn.Module | None = None,
    from_uni_controlnet: bool = False,
) -> ConvertedCheckpoint:
    """Convert ``checkpoint`` (a path to a ``.ckpt``/``.pth``/``.safetensors``, read by
    :func:`read_checkpoint` without unpickling code, or a state dict)
    and load it into the given fusers. A Uni-ControlNet local adapter initialises the UNet copy
    and FDN layers only (``from_uni_controlnet=True``), leaving the depth encoder as it is."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    converted = convert_cnc_checkpoint(checkpoint, skip_feature_extractor=from_uni_controlnet)
    if local_fuser is not None:
        if converted.local_fuser is None:
            raise UnmatchedKeysError("checkpoint has no local_adapter.* keys", [])
        allow = ("depth_encoder.",) if from_uni_controlnet else ()
        load_into(local_fuser, converted.local_fuser, "local fuser", allow_missing=allow)
    if global_fuser is not None:
        if converted.global_fuser is None:
            raise UnmatchedKeysError("checkpoint has no global_adapter.* keys", [])
        load_into(global_fuser, converted.global_fuser, "global fuser")
    return converted
