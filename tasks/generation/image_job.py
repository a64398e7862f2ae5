"""Shards of rows -> image shards on the shard-job runner (:mod:`tasks.shard_job`).

Shared by batch generation and GLoD sweeps. A shard's inputs are its raw rows; the driver parses
them (a bad row is a reject with its reason), forms the UNet groups, and either runs them in this
process (``local``) or streams them through a Ray Data actor pool (``ray``, :mod:`pool`). A shard
is written (png + the row as json per sample, a reject row per failure) when its last row is
back, and committed atomically by the runner's writer: ``images + rejects == rows``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any, Callable

import pyarrow as pa

from tasks.shard_job import RunOptions, Shard, ShardJob, describe

log = logging.getLogger(__name__)

Parsed = tuple[list[dict[str, Any]], list[tuple[str, str, str]]]
"""Valid rows (JSON-able dicts with an ``id``) and rejects ``(source_id, reason, detail)``."""


class ImageShardJob(ShardJob):
    """What a subclass supplies: :meth:`parse`, :meth:`groups`, ``worker_kind``, :meth:`worker_kwargs`,
    and optionally :meth:`index_extra` (more index columns from a row's result)."""

    worker_kind: str = ""
    executors: tuple[str, ...] = ("ray", "local")  # models load once per actor, not once per process
    extra_columns: dict[str, pa.DataType] = {}
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    _worker: Any = None

    def parse(self, shard: Shard) -> Parsed:
        raise NotImplementedError

    def groups(self, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        raise NotImplementedError

    def worker_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def sample_json(self, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        return row

    def index_extra(self, row: dict[str, Any] | None, result: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_worker"}  # the model stays where it was built

    # --------------------------------------------------------------------------------- running

    def process_shard(self, shard: Shard) -> dict[str, int]:
        """Local executor: this process's worker (built once) runs the shard's groups."""
        from tasks.generation.workers import build_worker

        if self._worker is None:
            self._worker = build_worker(self.worker_kind, self.worker_kwargs())
        rows, rejects = self.parse(shard)
        results = {}
        for group in self.groups(rows):
            for result, png in self._worker(group):
                results[result["id"]] = (result, png)
        return self.write(shard, rows, rejects, results)

    def run_pending(self, pending: list[Shard], opts: RunOptions, done: Callable, failed: Callable) -> None:
        if opts.executor != "ray":
            return super().run_pending(pending, opts, done, failed)
        from tasks.generation.pool import run_groups

        parsed = {s.index: self.parse(s) for s in pending}
        by_index = {s.index: s for s in pending}
        items = [{"shard": i, "group": json.dumps(g)} for i, (rows, _) in parsed.items() for g in self.groups(rows)]
        collected: dict[int, dict[str, tuple[dict[str, Any], bytes | None]]] = defaultdict(dict)
        open_shards = set(by_index)

        def finish(i: int) -> None:
            rows, rejects = parsed[i]
            done(by_index[i], self.write(by_index[i], rows, rejects, collected.pop(i, {})))
            open_shards.discard(i)

        for i, (rows, _) in parsed.items():
            if not rows:
                finish(i)
        try:
            if items:
                for out in run_groups(items, self.worker_kind, self.worker_kwargs(), self.actors, self.gpus_per_actor,
                                      self.cpus_per_actor):
                    i, result = int(out["shard"]), json.loads(out["result"])
                    collected[i][result["id"]] = (result, out["png"] or None)
                    if i in open_shards and len(collected[i]) == len(parsed[i][0]):
                        finish(i)
        except Exception as exc:  # noqa: BLE001 - the pool failed: the open shards fail, a rerun redoes them
            for i in sorted(open_shards):
                failed(by_index[i], describe(exc))
            return
        for i in sorted(open_shards):
            failed(by_index[i], "the actor pool returned without every row of the shard")

    def write(self, shard: Shard, rows: list[dict[str, Any]], rejects: list[tuple[str, str, str]],
              results: dict[str, tuple[dict[str, Any], bytes | None]]) -> dict[str, int]:
        """The shard: samples in the rows' order, then the rejects; committed atomically."""
        with shard.writer(self.extra_columns or None) as writer:
            for source_id, reason, detail in rejects:
                writer.add_reject(source_id, reason, detail=detail[:500], **self.index_extra(None, None))
            for row in rows:
                result, png = results.get(row["id"], ({"reason": "lost", "message": "no result"}, None))
                extra = self.index_extra(row, result)
                if png:
                    files = {"png": png, "json": json.dumps(self.sample_json(row, result), sort_keys=True).encode()}
                    writer.add_sample(row["id"], row["id"], files, row.get("prompt"), **extra)
                else:
                    writer.add_reject(row["id"], result.get("reason") or "generation_error",
                                      detail=str(result.get("message", ""))[:500], **extra)
            return writer.commit()
