"""Run ingest or build-triplets (executor ``local``) in this process and die at a planted point.

Started by test_resume_windows.py in its own process, so the crash is a real one: ``os._exit``
runs no ``finally`` block, the lease stays behind, temporary files stay, nothing is flushed.
Exits with :data:`CRASHED` when the planted point was reached, 0 if the job finished without
reaching it (the test then fails: no crash happened where it meant one).

Argument: one JSON object ``{"job": "ingest"|"triplets", "args": [...], "kwargs": {...},
"crash": {...}}`` where ``crash`` is one of

- ``{"at": "index", "url": U}``: die once the tar beside index ``U`` is published, before ``U``
  is written (the window between a shard's tar and its commit marker);
- ``{"at": "inpaint", "call": N}``: die when the inpainting stage receives its ``N``-th batch
  (batches before it are staged, the ``N``-th is lost in flight).
"""

from __future__ import annotations

import json
import os
import sys

CRASHED = 86


def plant(crash: dict) -> None:
    if crash["at"] == "index":
        import tasks.shards as shards

        write_index = shards.write_index

        def dying_write_index(url: str, *args, **kwargs) -> None:
            if url == crash["url"]:
                os._exit(CRASHED)
            write_index(url, *args, **kwargs)

        shards.write_index = dying_write_index
    elif crash["at"] == "inpaint":
        from tasks.triplets import stages

        calls = 0

        class DyingInpaint(stages.InpaintStage):
            def __call__(self, batch):
                nonlocal calls
                calls += 1
                if calls == crash["call"]:
                    os._exit(CRASHED)
                return super().__call__(batch)

        stages.STAGE_CLASSES["inpaint"] = DyingInpaint
    else:
        raise ValueError(f"unknown crash point {crash}")


def main(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)  # as the test process (tests/conftest.py): the same float results
    plant(spec["crash"])
    if spec["job"] == "ingest":
        from tasks.ingest import run_ingest

        run_ingest(*spec["args"], **spec["kwargs"])
    else:
        from tasks.triplets.job import StageOptions, run_triplets

        kwargs = dict(spec["kwargs"])
        kwargs["stages"] = {k: StageOptions(**v) for k, v in kwargs.get("stages", {}).items()}
        run_triplets(*spec["args"], **kwargs)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    sys.exit(0)
