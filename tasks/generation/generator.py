"""Rows -> PNG images with one loaded pipeline: the body of the generation actor.

Rows are grouped by :func:`settings_key` (and the size of their spatial conditions), and each
group goes through the UNet ``batch_size`` rows at a time, every row with its own seeded
generator, so a row's image is the one ``cnc generate`` makes for it alone. Runs in a plain loop
or as a Ray Data actor (load in ``__init__``, map in ``__call__``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from tasks.generation.conditions import read_condition, resolve
from tasks.generation.rows import GenerationRow, RowError, settings_key

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A row's image (PNG bytes) or the reason it has none."""

    row_id: str
    png: bytes | None = None
    reason: str = ""
    message: str = ""


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes (no metadata, fixed compression)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _spatial(array: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` -> ``(H, W, C)`` so rows stack into ``(B, H, W, C)``."""
    return array[..., None] if array.ndim == 2 else array


class BatchGenerator:
    """Loads a CnC pipeline once; :meth:`generate` turns rows into images or reject reasons."""

    def __init__(self, model: str = "tiny", device: str | None = None, batch_size: int = 4,
                 condition_root: str | None = None, torch_threads: int | None = None) -> None:
        from cnc_model.loading import load_pipeline

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.pipe = load_pipeline(model, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.batch_size = max(1, int(batch_size))
        self.condition_root = condition_root

    def load_conditions(self, row: GenerationRow) -> dict[str, Any]:
        """The row's condition files, decoded (RowError for a missing or corrupt one)."""
        return {name: read_condition(resolve(value, self.condition_root), name)
                for name, value in row.conditions().items()}

    def generate(self, rows: Sequence[GenerationRow]) -> list[Outcome]:
        """One :class:`Outcome` per row, in the rows' order."""
        outcomes: dict[str, Outcome] = {}
        groups: dict[tuple, list[tuple[GenerationRow, dict[str, Any]]]] = {}
        for row in rows:
            try:
                conditions = self.load_conditions(row)
            except RowError as exc:
                outcomes[row.id] = Outcome(row.id, reason=exc.reason, message=str(exc))
                continue
            shapes = tuple((k, np.shape(v)) for k, v in sorted(conditions.items()) if isinstance(v, np.ndarray))
            groups.setdefault((settings_key(row), shapes), []).append((row, conditions))
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                for outcome in self._run_chunk(chunk):
                    outcomes[outcome.row_id] = outcome
        return [outcomes[row.id] for row in rows]

    def _run_chunk(self, chunk: list[tuple[GenerationRow, dict[str, Any]]]) -> list[Outcome]:
        try:
            images = self._call_pipeline(chunk)
        except (ValueError, TypeError, RuntimeError) as exc:
            if len(chunk) > 1:  # find the row at fault: one at a time
                return [o for item in chunk for o in self._run_chunk([item])]
            row = chunk[0][0]
            return [Outcome(row.id, reason="generation_error", message=str(exc).splitlines()[0][:300])]
        return [Outcome(row.id, png=encode_png(image)) for (row, _), image in zip(chunk, images)]

    def _call_pipeline(self, chunk: list[tuple[GenerationRow, dict[str, Any]]]) -> list[Image.Image]:
        first = chunk[0][0]
        kinds = first.conditions().keys()
        batched: dict[str, Any] = {}
        for name in kinds:
            values = [conditions[name] for _, conditions in chunk]
            if name in ("fg_exemplar", "bg_exemplar"):
                batched[name] = values
            else:
                batched[name] = np.stack([_spatial(v) for v in values])
        device = self.pipe.device
        generators = [torch.Generator(device=device).manual_seed(row.seed) for row, _ in chunk]
        result = self.pipe(
            [row.prompt for row, _ in chunk],
            [row.negative_prompt for row, _ in chunk],
            **batched,
            lambda_fg=first.lambda_fg,
            lambda_bg=first.lambda_bg,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
        )
        return list(result.images)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data entry: a batch of parsed rows (``row`` column of dicts) -> outcomes."""
        rows = [GenerationRow(**r) for r in _as_list(batch["row"])]
        outcomes = self.generate(rows)
        return {"id": [o.row_id for o in outcomes], "png": [o.png or b"" for o in outcomes],
                "reason": [o.reason for o in outcomes], "message": [o.message for o in outcomes]}


def _as_list(column: Iterable[Any]) -> list[Any]:
    return list(column.tolist() if hasattr(column, "tolist") else column)
