"""The summary artifact reports the real throughput of every job (build-triplets counts sources)."""

from __future__ import annotations

import flows.artifacts as artifacts


def test_the_triplets_summary_reports_sources_per_second(monkeypatch):
    made: dict[str, str] = {}
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda key, markdown, description: made.update(
        {key: markdown}))
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: None)
    counts = {"sources": 6, "triplets": 5, "rejects": 1, "shards": 2}
    artifacts.publish_counts("build-triplets", "Triplets", counts, {"blank_image": 1}, 12.0, inputs=6)
    assert "| inputs/s | 0.50 |" in made["build-triplets-summary"]
    artifacts.publish_counts("ingest", "Ingest", {"inputs": 10, "samples": 10}, {}, 4.0)
    assert "| inputs/s | 2.50 |" in made["ingest-summary"]
