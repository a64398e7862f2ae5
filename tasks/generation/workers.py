"""The two kinds of generation worker behind one signature: a group of rows (JSON-able dicts)
in, ``(result, png)`` per row out. ``cnc``: batch generation rows; ``glod``: sweep rows."""

from __future__ import annotations

from typing import Any, Callable

Worker = Callable[[list[dict[str, Any]]], list[tuple[dict[str, Any], bytes | None]]]


def build_worker(kind: str, kwargs: dict[str, Any]) -> Worker:
    if kind == "cnc":
        return _cnc_worker(**kwargs)
    if kind == "glod":
        return _glod_worker(**kwargs)
    raise ValueError(f"unknown worker kind {kind!r}")


def _cnc_worker(**kwargs: Any) -> Worker:
    from tasks.generation.generator import BatchGenerator
    from tasks.generation.rows import GenerationRow

    generator = BatchGenerator(**kwargs)

    def run(group: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes | None]]:
        outcomes = generator.generate([GenerationRow(**r) for r in group])
        return [({"id": o.row_id, "reason": o.reason, "message": o.message}, o.png) for o in outcomes]

    return run


def _glod_worker(**kwargs: Any) -> Worker:
    from tasks.generation.glod_render import GLoDRenderer
    from tasks.generation.sweep import SweepRow

    renderer = GLoDRenderer(**kwargs)

    def run(group: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bytes | None]]:
        outcomes = renderer.render([SweepRow(**r) for r in group])
        return [({"id": o.row_id, "reason": o.reason, "message": o.message, "global_score": o.global_score,
                  "local_score": o.local_score}, o.png) for o in outcomes]

    return run
