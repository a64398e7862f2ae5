"""Condition fidelity of generated images (what no peer reports): does the image follow its
conditions?

- depth error: the depth estimated on the generated image (the preset's DPT / MiDaS, normalised to
  [0, 1] per image like the conditioning maps) against the conditioning depth maps: mean absolute
  error over the foreground region for ``fg_depth`` and over the rest for ``bg_depth``;
- exemplar similarity: CLIP image-image cosine between the generated image with only the
  foreground region kept (the rest zeroed) and the fg exemplar, and with only the background kept
  and the bg exemplar.

The foreground region is the row's mask, else ``fg_depth > 0.1 · max`` (the pipeline's own rule);
without either, the whole image. Condition files are read under the job's condition root, as the
generator reads them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tasks.generation.conditions import read_condition, resolve
from tasks.generation.rows import RowError

KEYS = ("depth_fg_error", "depth_bg_error", "exemplar_fg_similarity", "exemplar_bg_similarity")


def _gray(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A condition map ``(H, W[, C])`` in [0, 1] -> ``(h, w)`` at the image's size."""
    gray = array.mean(axis=-1) if array.ndim == 3 else array
    tensor = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


class ConditionFidelity:
    """Loads the depth estimator once; :meth:`measure` scores one generated image against its row."""

    def __init__(self, depth: str, aligner: Any, condition_root: str | None, device: str = "cpu") -> None:
        from cnc_model.annotators.depth import DepthEstimator

        self.depth = DepthEstimator.tiny(device=device) if depth == "tiny" else DepthEstimator.from_pretrained(
            depth, device=device)
        self.aligner = aligner
        self.condition_root = condition_root

    def measure(self, image: np.ndarray, row: dict[str, Any]) -> dict[str, float]:
        """The fidelity scores this row's conditions allow (none for a prompt-only row or one whose
        condition files cannot be read)."""
        names = [n for n in ("fg_depth", "bg_depth", "fg_exemplar", "bg_exemplar", "mask") if row.get(n)]
        if not names:
            return {}
        try:
            cond = {n: read_condition(resolve(str(row[n]), self.condition_root), n) for n in names}
        except RowError:
            return {}
        h, w = image.shape[:2]
        fg_depth = _gray(cond["fg_depth"], (h, w)) if "fg_depth" in cond else None
        bg_depth = _gray(cond["bg_depth"], (h, w)) if "bg_depth" in cond else None
        if "mask" in cond:
            region = _gray(cond["mask"], (h, w)) > 0.5
        elif fg_depth is not None:
            region = fg_depth > 0.1 * max(float(fg_depth.max()), 1e-8)
        else:
            region = np.ones((h, w), bool)
        out: dict[str, float] = {}
        if fg_depth is not None or bg_depth is not None:
            estimated = self.depth.predict([image])[0]
            if fg_depth is not None and region.any():
                out["depth_fg_error"] = float(np.abs(estimated - fg_depth)[region].mean())
            if bg_depth is not None and (~region).any():
                out["depth_bg_error"] = float(np.abs(estimated - bg_depth)[~region].mean())
        pairs = [(key, cond[name], keep) for key, name, keep in (("exemplar_fg_similarity", "fg_exemplar", region),
                                                                  ("exemplar_bg_similarity", "bg_exemplar", ~region))
                 if name in cond and keep.any()]
        if pairs:
            crops = [image * keep[..., None].astype(image.dtype) for _, _, keep in pairs]
            exemplars = [np.asarray(ex) for _, ex, _ in pairs]
            embeds = self.aligner.image_embeds(crops + exemplars)
            k = len(pairs)
            for i, (key, _, _) in enumerate(pairs):
                out[key] = float((embeds[i] * embeds[k + i]).sum())
        return out
