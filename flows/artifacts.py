"""Summaries attached to flow runs as Prefect artifacts (what a user sees in the UI)."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.redact import redact_text


def publish_counts(key: str, title: str, counts: dict[str, Any], rejects_by_reason: dict[str, int],
                   seconds: float, inputs: int | None = None) -> None:
    """A markdown summary (counts, throughput) and a table of reject reasons. ``inputs`` is what the
    throughput counts (default ``counts["inputs"]``; build-triplets counts its sources). URLs in the
    title lose their credentials (artifacts are stored on the Prefect server)."""
    title = redact_text(title)
    inputs = counts.get("inputs", 0) if inputs is None else inputs
    rate = inputs / seconds if seconds else 0.0
    lines = [f"# {title}", "", "| what | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += [f"| seconds | {seconds:.1f} |", f"| inputs/s | {rate:.2f} |"]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines), description=title)
    table = [{"reason": r, "count": n} for r, n in sorted(rejects_by_reason.items(), key=lambda kv: -kv[1])]
    create_table_artifact(key=f"{key}-rejects", table=table or [{"reason": "(none)", "count": 0}],
                          description=f"{title}: reject reasons")
