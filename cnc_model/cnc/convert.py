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

A Uni-ControlNet checkpoint (``uni.ckpt``) has the same local-adapter layout except its condition
encoder's first stage, ``feature_extractor.pre_extractor.*`` (one stream of 21 channels, where CnC
has ``fg_extractor`` / ``bg_extractor``); it also holds Uni's content adapter ``global_adapter.*``
(``ff1``/``ff2``/``norm1``/``norm2``, no fg/bg streams). The reference's ``init_local_fromuni``
copies every same-named key, so ``extractors.*`` and ``zero_convs.*`` come along and the rest is new.

Files are read without unpickling arbitrary objects (:func:`read_checkpoint`): safetensors as is,
``.ckpt`` / ``.pth`` through ``torch.load(weights_only=True)`` with an allow-list of the few
globals a full Lightning checkpoint needs (its ``AttributeDict`` read as a plain dict, numpy
scalars and arrays in callback states).
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
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
UNI_ONLY_LOCAL = ("feature_extractor.pre_extractor.",)
"""Uni-ControlNet local-adapter keys with no same-named CnC key (its one-stream condition encoder)."""


class _LightningCallback:
    """Stands in for a Lightning callback class, which older Lightning pickles as a dict key."""


def _lightning_allowlist() -> list:
    """Globals a full Lightning checkpoint pickles besides tensors, each mapped to a harmless type:
    Lightning's ``AttributeDict`` (hyper-parameters) is read as an ``OrderedDict``; callback classes
    (keys of ``callbacks`` before Lightning 1.6) as a placeholder class; numpy scalars, dtypes and
    arrays (callback states) as numpy's own, under both numpy 1 and 2 module names."""
    allow: list = []
    for package in ("pytorch_lightning", "lightning.pytorch"):
        for module, name in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                             ("lr_monitor", "LearningRateMonitor")):
            allow.append((_LightningCallback, f"{package}.callbacks.{module}.{name}"))
    for module in ("pytorch_lightning.utilities.parsing", "lightning.pytorch.utilities.parsing",
                   "lightning_fabric.utilities.data", "lightning.fabric.utilities.data"):
        allow.append((collections.OrderedDict, f"{module}.AttributeDict"))
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for package in ("numpy.core", "numpy._core"):
        allow += [(core.scalar, f"{package}.multiarray.scalar"), (core._reconstruct, f"{package}.multiarray._reconstruct")]
    allow += [np.dtype, np.ndarray, argparse.Namespace]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allow.append((getattr(np.dtypes, name), f"numpy.dtypes.{name}"))
    return allow


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: safetensors (by extension or content) directly; otherwise ``torch.load`` with
    ``weights_only=True`` and the Lightning allow-list (never arbitrary unpickling). A file that
    needs any other global is refused with the globals named. Unwraps a ``state_dict`` entry."""
    path = str(path)
    with open(path, "rb") as fh:
        head = fh.read(9)  # safetensors: an 8-byte header length, then the JSON header
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals(_lightning_allowlist()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the names are a courtesy; the refusal stands
            unsafe = []
        names = ", ".join(name for name in unsafe if name not in {n for _, n in _named(_lightning_allowlist())})
        raise ValueError(f"{path}: refused to unpickle (only tensors, Lightning metadata and numpy scalars are "
                         f"allowed){': needs ' + names if names else ''}; convert it to safetensors") from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a state dict (got {type(checkpoint).__name__})")
    return checkpoint


def _named(allow: list) -> list[tuple]:
    return [item if isinstance(item, tuple) else (item, f"{item.__module__}.{item.__qualname__}") for item in allow]


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
    state_dict: dict[str, torch.Tensor], from_uni_controlnet: bool = False
) -> ConvertedCheckpoint:
    """Rename an official CnC state dict, or (``from_uni_controlnet=True``) a Uni-ControlNet one as
    the reference's ``init_local_fromuni`` reads it: every same-named local-adapter key, Uni's
    ``pre_extractor`` and content adapter skipped. Raises :class:`UnmatchedKeysError` naming
    every key that fits nowhere."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    local_src = {k[len(LOCAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(LOCAL_PREFIX)}
    local: dict[str, torch.Tensor] | None = None
    glob: dict[str, torch.Tensor] | None = None
    skipped, unmatched = [], []
    if local_src:
        layers = _layers_from_blocks(local_src) if from_uni_controlnet else infer_layers_per_block(list(local_src))
        local = {}
        for key, value in local_src.items():
            if from_uni_controlnet and key.startswith(UNI_ONLY_LOCAL):
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
        if key.startswith(GLOBAL_PREFIX) and from_uni_controlnet:
            skipped.append(key)  # Uni's content adapter: not CnC's global fuser
        elif key.startswith(GLOBAL_PREFIX):
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


def load_cnc_checkpoint(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    local_fuser: nn.Module | None = None,
    global_fuser: nn.Module | None = None,
    from_uni_controlnet: bool = False,
) -> ConvertedCheckpoint:
    """Convert ``checkpoint`` (a path to a ``.ckpt``/``.pth``/``.safetensors``, read by
    :func:`read_checkpoint`, or a state dict) and load it into the given fusers. A Uni-ControlNet
    checkpoint (``from_uni_controlnet=True``) initialises the UNet copy, the FDN layers and the
    depth encoder's ``extractors`` / ``zero_convs``; the fg/bg streams keep their initialisation."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    converted = convert_cnc_checkpoint(checkpoint, from_uni_controlnet=from_uni_controlnet)
    if local_fuser is not None:
        if converted.local_fuser is None:
            raise UnmatchedKeysError("checkpoint has no local_adapter.* keys", [])
        allow = ("depth_encoder.fg_stream.", "depth_encoder.bg_stream.") if from_uni_controlnet else ()
        load_into(local_fuser, converted.local_fuser, "local fuser", allow_missing=allow)
    if global_fuser is not None:
        if converted.global_fuser is None:
            raise UnmatchedKeysError("checkpoint has no CnC global_adapter.* keys", [])
        load_into(global_fuser, converted.global_fuser, "global fuser")
    return converted
