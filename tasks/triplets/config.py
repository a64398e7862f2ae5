"""build-triplets' config: the one owner of its defaults (the CLI options and the Prefect parameters
read them from here), kept free of heavy imports so ``cnc --help`` stays fast."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

PRESETS = ("tiny", "sd15")
INPAINT_STEPS = 25  # denoising steps of the inpainting stage unless its cfg says otherwise


@dataclass(frozen=True)
class StageOptions:
    """Resources and batch size of one stage's actor pool; ``None`` picks the defaults that
    ``tasks.triplets.resources`` describes."""

    batch_size: int = 8
    num_cpus: float | None = None
    num_gpus: float = 0.0
    min_actors: int | None = None
    max_actors: int | None = None
    memory_gib: float | None = None  # Ray's memory request per actor (scheduling, not a limit)
    cfg: dict[str, Any] = field(default_factory=dict)  # passed to the stage's constructor


@dataclass(frozen=True)
class TripletsConfig:
    ingest_url: str
    out_url: str
    preset: str = "tiny"
    clip: bool = False
    latents: bool = False
    stages: dict[str, StageOptions] = field(default_factory=dict)

    def stage_names(self) -> list[str]:
        from tasks.triplets.stages import stage_names

        return stage_names(self.clip, self.latents)

    def options(self, name: str) -> StageOptions:
        return self.stages.get(name, StageOptions())

    def needs_ray(self) -> bool:
        """Whether a stage asks for what only Ray's actor pools give: GPUs, pool sizes or memory."""
        return any(o.num_gpus or o.min_actors or o.max_actors or o.memory_gib for o in self.stages.values())

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("out_url")
        d["stages"] = {k: {"cfg": v.cfg} for k, v in sorted(self.stages.items())}  # resources don't change bytes
        return json.loads(json.dumps(d, sort_keys=True, default=str))
