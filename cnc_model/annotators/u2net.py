"""U2-Net salient-object detector (Qin et al., 2020) in torch, with a loader for the public weights.

The module names match the public reference model exactly (``stage1.rebnconvin.conv_s1.weight``,
``stage6.rebnconv4.bn_s1.running_var``, ``side1.weight``, ``outconv.weight``, ...), so the published
``u2net.pth`` / ``u2netp.pth`` state dicts load without renaming. The channel widths are a config:
:meth:`U2NetConfig.full` is the published U2-Net, :meth:`U2NetConfig.small` is U2-Net-P and
:meth:`U2NetConfig.tiny` runs in milliseconds on a CPU. ``save_pretrained`` / ``from_pretrained``
use a folder with ``config.json`` and ``model.safetensors`` like diffusers models do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# the 11 RSU stages in the order of the reference model, and each one's RSU height
STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6",
          "stage5d", "stage4d", "stage3d", "stage2d", "stage1d")
_HEIGHTS = (7, 6, 5, 4, 0, 0, 0, 4, 5, 6, 7)  # 0 = RSU-4F (dilated, no pooling)


@dataclass(frozen=True)
class U2NetConfig:
    """Channel widths of the 11 RSU stages (encoder stage1..6, decoder stage5d..1d)."""

    in_channels: int = 3
    out_channels: int = 1
    stage_out_channels: tuple[int, ...] = (64, 128, 256, 512, 512, 512, 512, 256, 128, 64, 64)
    stage_mid_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 256, 256, 128, 64, 32, 16)

    def __post_init__(self) -> None:
        if len(self.stage_out_channels) != 11 or len(self.stage_mid_channels) != 11:
            raise ValueError("U2-Net has 11 stages: give 11 output and 11 middle widths")

    @classmethod
    def full(cls) -> "U2NetConfig":
        """The published U2-Net (176 MB, ``u2net.pth``)."""
        return cls()

    @classmethod
    def small(cls) -> "U2NetConfig":
        """The published U2-Net-P (4.7 MB, ``u2netp.pth``)."""
        return cls(stage_out_channels=(64,) * 11, stage_mid_channels=(16,) * 11)

    @classmethod
    def tiny(cls) -> "U2NetConfig":
        """Same architecture, 8x narrower than U2-Net: milliseconds per image on a CPU."""
        return cls(stage_out_channels=(8, 16, 32, 64, 64, 64, 64, 32, 16, 8, 8),
                   stage_mid_channels=(4, 4, 8, 16, 32, 32, 32, 16, 8, 4, 2))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["_class_name"] = "U2Net"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "U2NetConfig":
        keys = {"in_channels", "out_channels", "stage_out_channels", "stage_mid_channels"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys})


class REBNCONV(nn.Module):
    """3x3 (dilated) conv -> batch norm -> ReLU; attribute names as in the reference."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _upsample_like(src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block of height L (RSU-L, L = 4..7): a small U-Net whose output adds its input conv.

    Modules: ``rebnconvin``, ``rebnconv1..L`` (the last dilated by 2), ``pool1..L-2`` (ceil-mode max
    pooling) and ``rebnconv{L-1}d..1d``, exactly the reference's ``RSU7`` ... ``RSU4``.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch)
        for i in range(1, height - 1):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
            setattr(self, f"rebnconv{i + 1}", REBNCONV(mid_ch, mid_ch))
        setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for i in range(height - 1, 1, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(mid_ch * 2, mid_ch))
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.height
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]
        for i in range(1, L - 1):
            skips.append(getattr(self, f"rebnconv{i + 1}")(getattr(self, f"pool{i}")(skips[-1])))
        hx = getattr(self, f"rebnconv{L}")(skips[-1])
        for i in range(L - 1, 0, -1):
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((hx, skips[i - 1]), 1))
            if i > 1:
                hx = _upsample_like(hx, skips[i - 2])
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4F: the RSU-4 shape with dilations 1, 2, 4, 8 instead of pooling (same resolution)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class U2Net(nn.Module):
    """U2-Net: six RSU encoder stages, five decoder stages, six side outputs and their 1x1 fusion.

    ``forward`` returns the seven sigmoid maps ``(fused, side1, ..., side6)`` at the input size, as the
    reference does; the fused map (index 0) is the saliency prediction.
    """

    def __init__(self, config: U2NetConfig | None = None):
        super().__init__()
        self.config = config = config or U2NetConfig()
        outs, mids = config.stage_out_channels, config.stage_mid_channels
        # input width of each stage: encoder chains, decoder concatenates (upsampled deeper, skip)
        ins = [config.in_channels, outs[0], outs[1], outs[2], outs[3], outs[4],
               outs[5] + outs[4], outs[6] + outs[3], outs[7] + outs[2], outs[8] + outs[1], outs[9] + outs[0]]
        for name, height, i, m, o in zip(STAGES, _HEIGHTS, ins, mids, outs):
            setattr(self, name, RSU(height, i, m, o) if height else RSU4F(i, m, o))
        for i in range(1, 6):
            setattr(self, f"pool{i}{i + 1}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        # side k reads decoder stage kd (k = 1..5) and encoder stage6 (k = 6)
        side_in = (outs[10], outs[9], outs[8], outs[7], outs[6], outs[5])
        for k, c in enumerate(side_in, start=1):
            setattr(self, f"side{k}", nn.Conv2d(c, config.out_channels, 3, padding=1))
        self.outconv = nn.Conv2d(6 * config.out_channels, config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        enc = []
        hx = x
        for k in range(1, 6):
            hx = getattr(self, f"stage{k}")(hx)
            enc.append(hx)
            hx = getattr(self, f"pool{k}{k + 1}")(hx)
        hx = self.stage6(hx)
        dec = {6: hx}
        for k in range(5, 0, -1):
            hx = _upsample_like(hx, enc[k - 1])
            hx = getattr(self, f"stage{k}d")(torch.cat((hx, enc[k - 1]), 1))
            dec[k] = hx
        sides = [self.side1(dec[1])]
        for k in range(2, 7):
            sides.append(_upsample_like(getattr(self, f"side{k}")(dec[k]), sides[0]))
        fused = self.outconv(torch.cat(sides, 1))
        return tuple(torch.sigmoid(t) for t in (fused, *sides))

    # ------------------------------------------------------------------------------ loading

    @staticmethod
    def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> U2NetConfig:
        """Read the widths off a reference-layout state dict (U2-Net, U2-Net-P or any width)."""
        outs, mids = [], []
        for name in STAGES:
            w_in = state_dict[f"{name}.rebnconvin.conv_s1.weight"]
            outs.append(int(w_in.shape[0]))
            mids.append(int(state_dict[f"{name}.rebnconv1.conv_s1.weight"].shape[0]))
        in_ch = int(state_dict["stage1.rebnconvin.conv_s1.weight"].shape[1])
        out_ch = int(state_dict["outconv.weight"].shape[0])
        return U2NetConfig(in_ch, out_ch, tuple(outs), tuple(mids))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "U2Net":
        """A model holding ``state_dict`` (reference key layout; a DataParallel ``module.`` prefix is
        stripped; ``num_batches_tracked`` buffers may be absent, as in the oldest checkpoints)."""
        state_dict = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        model = cls(cls.config_from_state_dict(state_dict))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"not a U2-Net state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()

    @classmethod
    def from_pth(cls, path: str | os.PathLike, map_location: str = "cpu") -> "U2Net":
        """Load the public ``u2net.pth`` / ``u2netp.pth`` (a pickled state dict of tensors)."""
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
        return cls.from_state_dict(state_dict)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "U2Net":
        """Load a folder written by :meth:`save_pretrained`, or a ``.pth`` file in the reference layout."""
        p = Path(path)
        if p.is_file():
            return cls.from_pth(p)
        if not p.is_dir():
            raise FileNotFoundError(f"U2-Net weights not found at {path} (a folder or a u2net.pth file; "
                                    "the weights are not on the hub: download u2net.pth and point here)")
        config = U2NetConfig.from_dict(json.loads((p / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(p / WEIGHTS_NAME)))
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` (reference key names) into folder ``path``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(p / WEIGHTS_NAME))


def tiny_u2net(seed: int = 0) -> U2Net:
    """Seeded tiny U2-Net with non-trivial batch-norm statistics (so eval mode is not the identity).

    The fusion conv is calibrated so that, on a fixed image (a bright box on black, in [0, 1]), the
    fused logit has mean 0 and std 3: random weights alone give sigmoids within ~0.01 of each other,
    all on one side of 0.5, so the reference's raw ``> 0.5`` rule would give empty masks."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = U2Net(U2NetConfig.tiny())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        model.eval()
        probe = torch.zeros(1, 3, 64, 64)
        probe[..., 16:48, 12:40] = 1.0
        logit = torch.logit(model(probe)[0].double().clamp(1e-12, 1 - 1e-12))
        scale = 3.0 / float(logit.std().clamp_min(1e-12))
        model.outconv.weight.mul_(scale)
        model.outconv.bias.copy_((model.outconv.bias - float(logit.mean())) * scale)
    return model
