"""One owner of defaults: the CLI options and the Prefect parameter models show the job configs' defaults."""

from __future__ import annotations

import typer

from flows.cli import app
from flows.params import BuildTripletsParams, IngestParams, StageParams
from tasks.ingest_config import IngestConfig
from tasks.run_options import RunOptions
from tasks.triplets.config import INPAINT_STEPS, StageOptions, TripletsConfig

INGEST = {"size": IngestConfig.size, "shard_size": IngestConfig.shard_size, "quality": IngestConfig.quality,
          "limit": IngestConfig.limit}
TRIPLETS = {"preset": TripletsConfig.preset, "clip": TripletsConfig.clip, "latents": TripletsConfig.latents,
            "inpaint_steps": INPAINT_STEPS}
RUNNER = {"executor": RunOptions.executor, "max_attempts": RunOptions.max_attempts,
          "shard_timeout": RunOptions.shard_timeout_s, "max_reject_share": RunOptions.max_reject_share}


def cli_defaults(command: str) -> dict:
    click_app = typer.main.get_command(app)
    return {p.name: p.default for p in click_app.commands[command].params}


def test_cli_defaults_are_the_configs():
    ingest = cli_defaults("ingest")
    assert {k: ingest[k] for k in (*INGEST, *RUNNER)} == {**INGEST, **RUNNER}
    triplets = cli_defaults("build-triplets")
    wanted = {"size": IngestConfig.size, "shard_size": IngestConfig.shard_size, "limit": None, **TRIPLETS,
              "gpus_per_inpaint_actor": StageOptions.num_gpus, "executor": RunOptions.executor,
              "max_reject_share": RunOptions.max_reject_share}
    assert {k: triplets[k] for k in wanted} == wanted


def test_prefect_parameter_defaults_are_the_configs():
    def defaults(model) -> dict:
        return {k: f.default for k, f in model.model_fields.items() if not f.is_required()}

    assert {k: v for k, v in defaults(IngestParams).items() if k in INGEST} == INGEST
    triplets = defaults(BuildTripletsParams)
    assert {k: triplets[k] for k in (*TRIPLETS, "size", "shard_size")} == {
        **TRIPLETS, "size": IngestConfig.size, "shard_size": IngestConfig.shard_size}
    assert defaults(IngestParams)["executor"] == triplets["executor"] == RunOptions.executor
    stage = defaults(StageParams)
    assert {k: stage[k] for k in ("batch_size", "num_gpus", "num_cpus", "min_actors", "max_actors", "memory_gib")} == {
        "batch_size": StageOptions.batch_size, "num_gpus": StageOptions.num_gpus, "num_cpus": StageOptions.num_cpus,
        "min_actors": StageOptions.min_actors, "max_actors": StageOptions.max_actors,
        "memory_gib": StageOptions.memory_gib}


def test_the_inpainting_stage_default_is_the_configs():
    import inspect

    from tasks.triplets.stages import InpaintStage

    assert inspect.signature(InpaintStage).parameters["num_inference_steps"].default == INPAINT_STEPS
