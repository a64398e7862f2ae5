"""Sweep rows -> GLoD images and their global / local CLIP alignment (the body of the sweep actor).

Renders exactly as ``cnc glod`` does for the same spec, model, steps and seed (the tiny model at
its small size with the spec's aspect), then scores each image against its spec with
:func:`cnc_model.metrics.alignment.spec_alignment` in one batched CLIP pass per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tasks.generation.generator import encode_png
from tasks.generation.sweep import SweepRow

TINY_STEPS = 10


@dataclass
class SweepOutcome:
    row_id: str
    png: bytes | None = None
    global_score: float = float("nan")
    local_score: float = float("nan")
    reason: str = ""
    message: str = ""


def load_glod_pipeline(model: str, device: str = "cpu") -> Any:
    """``"tiny"`` (seeded tiny SD), ``"sd15"`` (the preset's SD weights) or a folder / hub id."""
    from cnc_model.glod.pipeline_glod import GLoDPipeline
    from cnc_model.presets import get_preset

    if model == "tiny":
        from cnc_model.tiny import tiny_sd_components

        pipe = GLoDPipeline(**tiny_sd_components(0))
    else:
        pipe = GLoDPipeline.from_pretrained(get_preset(model).sd if model == "sd15" else model)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render_size(spec: Any, model: str) -> tuple[int | None, int | None]:
    """The output size ``cnc glod`` uses: the spec's own, or the tiny model's small one."""
    if model != "tiny":
        return None, None
    from cnc_model.tiny import TINY_RESOLUTION

    scale = TINY_RESOLUTION / min(spec.width, spec.height)
    height, width = (max(8, round(v * scale / 8) * 8) for v in (spec.height, spec.width))
    return height, width


class GLoDRenderer:
    """Loads the GLoD pipeline and CLIP once; :meth:`render` makes and scores a list of rows."""

    def __init__(self, model: str = "tiny", clip: str = "tiny", steps: int = TINY_STEPS, device: str = "cpu",
                 torch_threads: int | None = None) -> None:
        from cnc_model.metrics.alignment import load_aligner

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model, self.steps = model, steps
        self.pipe = load_glod_pipeline(model, device)
        self.aligner = load_aligner(clip, device=device)

    def render(self, rows: Sequence[SweepRow]) -> list[SweepOutcome]:
        from cnc_model.glod.spec import parse_spec
        from cnc_model.metrics.alignment import spec_alignment

        outcomes, images, specs, scored = [], [], [], []
        for row in rows:
            if row.spec is None:
                outcomes.append(SweepOutcome(row.id, reason=row.reason, message=row.message))
                continue
            spec = parse_spec(row.spec)
            height, width = render_size(spec, self.model)
            try:
                image = self.pipe(spec, height=height, width=width, num_inference_steps=self.steps,
                                  generator=torch.Generator(device="cpu").manual_seed(row.seed)).images[0]
            except (ValueError, RuntimeError) as exc:
                outcomes.append(SweepOutcome(row.id, reason="generation_error", message=str(exc).splitlines()[0]))
                continue
            outcome = SweepOutcome(row.id, png=encode_png(image))
            outcomes.append(outcome)
            images.append(image)
            specs.append(spec)
            scored.append(outcome)
        if images:
            for outcome, scores in zip(scored, spec_alignment(self.aligner, images, specs)):
                outcome.global_score = float(np.mean(scores["global"])) if scores["global"] else float("nan")
                outcome.local_score = float(np.mean(scores["local"])) if scores["local"] else float("nan")
        return outcomes
