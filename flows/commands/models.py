"""``cnc models``: the model registry from the command line (list, show, register, promote, rollback).

The registry is an fsspec URL (``--registry`` or ``CNC_REGISTRY``); nothing else is needed.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

app = typer.Typer(help="The model registry: versions, the champion, promote and roll back.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

RegistryOpt = typer.Option(..., "--registry", envvar="CNC_REGISTRY", help="registry URL (folder, s3://...)")


def _registry(url: str):
    from tasks.registry import Registry

    return Registry(url)


def _guard(fn):
    """Run a registry call; a refusal or an I/O error is one line and status 2 / 1."""
    from flows.errors import fail
    from tasks.redact import redact_text
    from tasks.registry import RegistryError

    try:
        return fn()
    except RegistryError as exc:
        fail(redact_text(str(exc)))
    except OSError as exc:
        fail(redact_text(str(exc) or type(exc).__name__), code=1)


@app.command("list")
def list_versions(registry: str = RegistryOpt) -> None:
    """Every version, oldest first; the champion is marked with '*'."""
    reg = _registry(registry)
    versions = _guard(reg.versions)
    champion = _guard(reg.champion)
    if not versions:
        typer.echo("no versions")
        return
    for v in versions:
        mark = "*" if champion and v.version == champion.version else " "
        metrics = ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}"
                            for k, val in sorted(v.metrics.items()))
        typer.echo(f"{mark} {v.version}  {v.created_at}  data {v.data_manifest_hash[:12]}  {metrics}")


@app.command("show")
def show(version: Optional[str] = typer.Argument(None, help="a version id (default: the champion)"),
         registry: str = RegistryOpt) -> None:
    """A version's record as JSON (metrics, data manifest hash, files), and the history if no version is given."""
    from flows.errors import fail

    reg = _registry(registry)
    if version is None:
        champion = _guard(reg.champion)
        if champion is None:
            fail("no champion yet (cnc models promote VERSION --reason ...)")
        record = {**champion.to_json(), "champion": True,
                  "history": [e.__dict__ for e in _guard(reg.history)]}
    else:
        record = _guard(lambda: reg.get(version)).to_json()
        champion = _guard(reg.champion)
        record["champion"] = bool(champion and champion.version == version)
    typer.echo(json.dumps(record, indent=2, sort_keys=True))


@app.command("register")
def register(folder: str = typer.Argument(..., help="a saved pipeline folder (save_pretrained)"),
             train_report: str = typer.Option(..., "--train-report", help="URL of train_report.json"),
             metrics: str = typer.Option(..., "--metrics", help="URL of metrics.json"),
             data_manifest: str = typer.Option(..., "--data-manifest", help="URL of the training data's manifest.json"),
             note: str = typer.Option("", "--note", help="free text kept with the version"),
             registry: str = RegistryOpt) -> None:
    """Copy a pipeline folder and its reports in as a new version (not yet the champion)."""
    reg = _registry(registry)
    v = _guard(lambda: reg.register(folder, {"train_report": train_report, "metrics": metrics,
                                             "data_manifest": data_manifest}, note=note))
    typer.echo(v.version)


@app.command("promote")
def promote(version: str = typer.Argument(..., help="the version to make champion"),
            reason: str = typer.Option(..., "--reason", help="why (kept in the history)"),
            registry: str = RegistryOpt) -> None:
    """Make a version the champion (atomic; the history keeps the previous one)."""
    event = _guard(lambda: _registry(registry).promote(version, reason))
    typer.echo(f"champion: {event.version} (was {event.previous or 'none'})")


@app.command("rollback")
def rollback(reason: str = typer.Option(..., "--reason", help="why (kept in the history)"),
             to: Optional[str] = typer.Option(None, "--to", help="a version (default: the champion before this one)"),
             registry: str = RegistryOpt) -> None:
    """Go back to the previous champion (or to --to)."""
    event = _guard(lambda: _registry(registry).rollback(reason, to=to))
    typer.echo(f"champion: {event.version} (was {event.previous})")
