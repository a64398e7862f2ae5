"""GLoD sweep files -> generation rows: specs x a grid of weights, step ranges, layout strengths, seeds.

A sweep file (YAML)::

    model: tiny                     # tiny, sd15, or a folder of SD 1.x / GLoD weights
    steps: 10                       # denoising steps of every image
    specs:                          # name -> spec file (relative to this file) or an inline spec
      cafe: glod_spec.yaml
    grid:                           # every combination becomes one image per spec
      global_weight: [5.0, 7.5]     # every global prompt's weight
      local_weight: [2.0, 4.0]      # every local prompt's weight
      local_steps: [[0.0, 0.8]]     # the local guidance's step range
      layout_strength: [0.0]        # layout guidance strength (0 = off)
      seed: [0, 1]
    contact_sheet: {rows: global_weight, columns: local_weight}

A spec that does not validate, as written or once a grid point is applied, makes reject rows
with the reason (``images + rejects == rows``); a malformed sweep file is one clear error.
"""

from __future__ import annotations

import itertools
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AXES = ("global_weight", "local_weight", "local_steps", "layout_strength", "seed")
"""Grid axes a sweep may vary (seed is always one; absent axes keep the spec's values)."""
MAX_ROWS = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SweepError(ValueError):
    """The sweep file itself is malformed (not one of its specs)."""


@dataclass(frozen=True)
class SweepRow:
    """One image of a sweep: a spec name, the grid point, and the varied spec (or why it has none)."""

    id: str
    spec_name: str
    point: dict[str, Any]
    seed: int
    spec: dict[str, Any] | None = None
    reason: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "spec_name": self.spec_name, "point": self.point, "seed": self.seed,
                "spec": self.spec}


@dataclass
class Sweep:
    model: str
    steps: int
    rows: list[SweepRow]
    axes: list[str]
    contact_rows: str
    contact_columns: str
    spec_names: list[str] = field(default_factory=list)


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep YAML; SweepError naming the problem for a malformed file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SweepError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path}: cannot parse: {str(exc).splitlines()[0]}") from None
    return parse_sweep(data, path.parent)


def parse_sweep(data: Any, base: Path) -> Sweep:
    """The sweep of a parsed YAML mapping; spec files and masks are read under ``base``."""
    if not isinstance(data, dict):
        raise SweepError("a sweep file is a mapping with specs and grid")
    unknown = sorted(set(data) - {"model", "steps", "specs", "grid", "contact_sheet"})
    if unknown:
        raise SweepError(f"unknown sweep field(s): {', '.join(unknown)}")
    steps = data.get("steps", 50)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise SweepError(f"steps must be an integer in [1, 1000], got {steps!r}")
    specs = data.get("specs")
    if not isinstance(specs, dict) or not specs:
        raise SweepError("specs must map names to spec files or inline specs")
    for name in specs:
        if not isinstance(name, str) or not _NAME.match(name):
            raise SweepError(f"spec name {name!r} must be 1-64 letters, digits, '_' or '-'")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError("grid must map axes to lists of values")
    bad_axes = sorted(set(grid) - set(AXES))
    if bad_axes:
        raise SweepError(f"unknown grid axis(es) {', '.join(map(str, bad_axes))}; known: {', '.join(AXES)}")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{axis} must be a non-empty list")
    grid.setdefault("seed", [0])
    for seed in grid["seed"]:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SweepError(f"grid.seed values must be non-negative integers, got {seed!r}")
    axes = [a for a in AXES if a in grid]
    total = len(specs) * int(math.prod(len(grid[a]) for a in axes))
    if total > MAX_ROWS:
        raise SweepError(f"the sweep has {total} images, more than {MAX_ROWS}: split it")
    sheet = data.get("contact_sheet") or {}
    varied = [a for a in axes if len(grid[a]) > 1] or axes
    contact_rows = sheet.get("rows", varied[0])
    contact_columns = sheet.get("columns", varied[1] if len(varied) > 1 else "seed")
    for axis in (contact_rows, contact_columns):
        if axis not in axes:
            raise SweepError(f"contact_sheet axis {axis!r} is not a grid axis ({', '.join(axes)})")
    rows: list[SweepRow] = []
    for name, source in specs.items():
        base_spec, reason, message = _read_spec(source, base)
        for i, values in enumerate(itertools.product(*(grid[a] for a in axes))):
            point = dict(zip(axes, values))
            row_id = f"{name}-{i:05d}"
            seed = int(point["seed"])
            if base_spec is None:
                rows.append(SweepRow(row_id, name, point, seed, reason=reason, message=message))
                continue
            spec, reason_, message_ = _vary(base_spec, point, base)
            rows.append(SweepRow(row_id, name, point, seed, spec=spec, reason=reason_, message=message_))
    return Sweep(model=str(data.get("model", "tiny")), steps=steps, rows=rows, axes=axes,
                 contact_rows=contact_rows, contact_columns=contact_columns, spec_names=list(specs))


def _read_spec(source: Any, base: Path) -> tuple[dict[str, Any] | None, str, str]:
    """The spec's dict (not yet validated) or a reject reason."""
    import yaml

    if isinstance(source, dict):
        return source, "", ""
    if not isinstance(source, str):
        return None, "invalid_spec", f"a spec is a file name or a mapping, got {type(source).__name__}"
    path = _under(base, source)
    if path is None:
        return None, "path_outside_root", f"spec file {source!r} is not under the sweep file's folder"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except OSError as exc:
        return None, "missing_spec", f"spec file {source}: {exc.strerror or exc}"
    except (ValueError, yaml.YAMLError) as exc:
        return None, "invalid_spec", f"spec file {source}: cannot parse: {str(exc).splitlines()[0]}"
    return data, "", ""


def _vary(spec: dict[str, Any], point: dict[str, Any], base: Path) -> tuple[dict[str, Any] | None, str, str]:
    """The spec with the grid point applied, validated (mask paths made absolute under ``base``)."""
    from cnc_model.glod.spec import SpecError, check_masks, parse_spec

    varied = json.loads(json.dumps(spec))  # a deep copy of plain data
    if not isinstance(varied, dict):
        return None, "invalid_spec", "the top level of a spec must be a mapping"
    if "global_weight" in point:
        for gp in varied.get("global_prompts") or []:
            if isinstance(gp, dict):
                gp["weight"] = point["global_weight"]
    for lp in varied.get("local_prompts") or []:
        if not isinstance(lp, dict):
            continue
        if "local_weight" in point:
            lp["weight"] = point["local_weight"]
        if isinstance(lp.get("mask"), str):
            mask = _under(base, lp["mask"])
            if mask is None:
                return None, "path_outside_root", f"mask {lp['mask']!r} is not under the sweep file's folder"
            lp["mask"] = str(mask)
    if "local_steps" in point:
        varied["local_steps"] = point["local_steps"]
    if "layout_strength" in point:
        varied.setdefault("layout_guidance", {})
        if isinstance(varied["layout_guidance"], dict):
            varied["layout_guidance"]["strength"] = point["layout_strength"]
    try:
        parsed = parse_spec(varied)
        check_masks(parsed)
    except SpecError as exc:
        return None, "invalid_spec", " ".join(line.strip() for line in str(exc).splitlines())[:500]
    return parsed.model_dump(mode="json"), "", ""


def _under(base: Path, name: str) -> Path | None:
    """``base/name`` if it stays under ``base`` (no absolute paths, no ``..``)."""
    normal = posixpath.normpath(name)
    if Path(name).is_absolute() or normal == ".." or normal.startswith("../"):
        return None
    return base / normal
