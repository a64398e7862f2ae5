"""Local regions at latent resolution: boxes and masks -> soft masks M_l in [0, 1].

Feathering ramps a region's values from its border inwards, never outwards: a region is exactly
zero outside its box or mask whatever the feather, so local guidance touches nothing outside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

MaskLike = Union[str, Path, PIL.Image.Image, np.ndarray, torch.Tensor]


def box_mask(
    box: Sequence[float], latent_size: tuple[int, int], feather: float = 0.0
) -> torch.Tensor:
    """Soft mask ``(h, w)`` of a box given as fractions ``(x0, y0, x1, y1)`` of the image.

    Each latent cell holds the fraction of its area inside the box (so boxes that do not fall on
    the latent grid get partial edge cells); ``feather`` (in latent cells) multiplies it by an
    inward ramp ``min(1, (d + 1/2) / feather)``, ``d`` the distance of the cell centre to the
    nearest box side that is not on the image border: on the latent grid and for a whole
    ``feather``, the same values as the mask of the same rectangle (:func:`mask_to_latent`).
    """
    h, w = latent_size
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)
    cover_x = (torch.minimum(xs + 1, torch.tensor(x1 * w)) - torch.maximum(xs, torch.tensor(x0 * w))).clamp(0, 1)
    cover_y = (torch.minimum(ys + 1, torch.tensor(y1 * h)) - torch.maximum(ys, torch.tensor(y0 * h))).clamp(0, 1)
    mask = cover_y[:, None] * cover_x[None, :]
    if feather > 0:
        # a side on the image border is not an edge between the region and the rest: no ramp there
        # (as a mask touching the border, whose erosion does not eat in from outside the image)
        inf = float("inf")
        cx, cy = xs + 0.5, ys + 0.5
        dx = torch.minimum(cx - x0 * w if x0 > 0 else cx + inf, x1 * w - cx if x1 < 1 else cx + inf)
        dy = torch.minimum(cy - y0 * h if y0 > 0 else cy + inf, y1 * h - cy if y1 < 1 else cy + inf)
        # cells counted from the edge (the edge cell is 1), as mask_to_latent's erosion counts them
        depth = torch.minimum(dy[:, None], dx[None, :]).clamp_min(0) + 0.5
        mask = mask * (depth / feather).clamp(max=1.0)
    return mask.float()


def load_mask(mask: MaskLike) -> torch.Tensor:
    """A grey-level mask ``(H, W)`` in [0, 1] from a path, PIL image, array or tensor."""
    if isinstance(mask, (str, Path)):
        with PIL.Image.open(mask) as img:
            mask = img.convert("L")
    if isinstance(mask, PIL.Image.Image):
        return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    if isinstance(mask, np.ndarray):
        arr = mask.astype(np.float32)
        if arr.max(initial=0) > 1:
            arr = arr / 255.0
        return torch.from_numpy(arr.squeeze())
    return mask.float().squeeze()


def mask_to_latent(mask: MaskLike, latent_size: tuple[int, int], feather: float = 0.0) -> torch.Tensor:
    """Soft mask ``(h, w)``: the area average of ``mask`` over each latent cell, then an inward
    ramp of ``ceil(feather)`` cells built by repeated 3x3 erosion (zero stays zero)."""
    m = load_mask(mask)
    if m.ndim != 2:
        raise ValueError(f"a region mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    m = F.adaptive_avg_pool2d(m[None, None].double(), latent_size)
    if feather > 0:
        steps = int(np.ceil(feather))
        eroded, acc = m, torch.zeros_like(m)
        for _ in range(steps):
            acc = acc + eroded
            eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
        m = torch.minimum(m, acc / steps)
    return m[0, 0].float()


def region_masks(
    boxes_or_masks: Sequence[Sequence[float] | MaskLike],
    latent_size: tuple[int, int],
    feather: float = 0.0,
) -> torch.Tensor:
    """Stack of regions ``(L, 1, h, w)``; each item a fractional box or a mask (see above)."""
    out = []
    for region in boxes_or_masks:
        if isinstance(region, (tuple, list)) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region):
            out.append(box_mask(region, latent_size, feather))
        else:
            out.append(mask_to_latent(region, latent_size, feather))
    if not out:
        return torch.zeros(0, 1, *latent_size)
    return torch.stack(out)[:, None]


def mask_to_image(mask: torch.Tensor, size: tuple[int, int]) -> PIL.Image.Image:
    """A (h, w) map in [0, 1] as an L-mode picture of ``size`` = (width, height), nearest-upscaled."""
    arr = (mask.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(arr, mode="L").resize(size, PIL.Image.NEAREST)
