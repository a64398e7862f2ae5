"""``cnc retrain``: one round of the retraining loop (the ``retrain-cnc`` flow) from the command line.

Defaults are the flow's (``RetrainParams``); the usual ones are options, any other field is
``--set NAME=VALUE`` (a JSON value, or a plain string). Exit status 0 whether the candidate was
promoted or kept (the last lines say which and why); 2 for a wrong argument, 1 for failed work.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from flows.retrain_params import RetrainParams

_F = RetrainParams.model_fields


def _default(name: str) -> Any:
    return _F[name].default


def parse_sets(values: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs: the value as JSON when it parses, else the string."""
    out: dict[str, Any] = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or name not in _F:
            raise ValueError(f"--set {value!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(_F))}")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


def retrain(
    data: str = typer.Option(..., "--data", help="triplet data: a build-triplets --out or its triplets/ folder"),
    registry: str = typer.Option(..., "--registry", envvar="CNC_REGISTRY", help="model registry URL"),
    work: str = typer.Option(..., "--work", help="URL for candidates and frozen evaluation sets"),
    eval_triplets: str = typer.Option(..., "--eval-triplets", help="held-out triplet set (the frozen rows)"),
    stage: str = typer.Option(_default("stage"), "--stage", help="full (fine-tune both fusers) or all"),
    init: str = typer.Option(_default("init"), "--init", help="start model when there is no champion"),
    force: bool = typer.Option(False, "--force", help="retrain even when the data is what the champion saw"),
    metric: str = typer.Option(_default("metric"), "--metric", help="<setting>.<metric> that decides"),
    margin: float = typer.Option(_default("margin"), "--margin", help="beat the champion by more than this"),
    relative: bool = typer.Option(False, "--relative", help="margin as a fraction of the champion's value"),
    epochs: Optional[int] = typer.Option(_default("epochs"), "--epochs", help="epochs of fine-tuning per stage"),
    preset: str = typer.Option(_default("preset"), "--preset", help="feature nets: sd15 or tiny (plumbing)"),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", help="FID Inception weights"),
    sets: list[str] = typer.Option([], "--set", help="NAME=VALUE for any other retrain-cnc parameter"),
) -> None:
    """Fine-tune the champion on newer triplets; promote the candidate only if it scores better."""
    from pydantic import ValidationError

    from flows.errors import fail, first_line

    try:
        params = RetrainParams(**{
            "data": data, "registry": registry, "work": work, "eval_triplets": eval_triplets, "stage": stage,
            "init": init, "force": force, "metric": metric, "margin": margin, "relative": relative, "epochs": epochs,
            "preset": preset, "inception_weights": inception_weights, **parse_sets(sets)})
    except ValidationError as exc:
        error = exc.errors()[0]
        fail(f"{'.'.join(str(p) for p in error['loc']) or 'parameters'}: {error['msg']}")
    except ValueError as exc:
        fail(first_line(exc))
    from flows.retrain_flow import retrain_cnc
    from tasks.redact import redact_text
    from tasks.registry import RegistryError
    from tasks.retraining.data_state import DataStateError

    try:
        result = retrain_cnc(params)
    except (DataStateError, RegistryError, FileNotFoundError) as exc:
        fail(redact_text(first_line(exc)))
    except Exception as exc:  # noqa: BLE001 - one line; a rerun continues where this one stopped
        fail(redact_text(f"retraining failed: {first_line(exc)}"), code=1)
    for row in result.get("table", [])[:1]:
        typer.echo(f"{row['metric']}: champion {row['champion']}, candidate {row['candidate']}")
    typer.echo(f"{result['action']}: {redact_text(result['reason'])}")
    typer.echo(f"champion: {result['champion'] or 'none'}")
