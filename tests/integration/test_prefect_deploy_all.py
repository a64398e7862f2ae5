"""README, "Prefect": `prefect deploy --all` from the repository root registers every deployment
that prefect.yaml names, against a real Prefect server (tests/integration/prefect_stack.py)."""

from __future__ import annotations

import json
import shlex
import urllib.request

import pytest
import yaml

from tests.integration.prefect_stack import REPO, PrefectStack

pytestmark = pytest.mark.slow


def post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{api}/{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def wanted_deployments() -> dict[str, dict]:
    """``flow/deployment`` -> its entry in prefect.yaml; the flow's name is the one its code declares."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows: dict[str, str] = {}
    wanted = {}
    for d in spec["deployments"]:
        if d["entrypoint"] not in flows:
            flows[d["entrypoint"]] = load_flow_from_entrypoint(str(REPO / d["entrypoint"])).name
        wanted[f"{flows[d['entrypoint']]}/{d['name']}"] = d
    assert len(wanted) == len(spec["deployments"])  # no two entries share a name
    return wanted


def readme_pool_commands() -> list[list[str]]:
    """The README's `prefect work-pool create ...` lines (its "Prefect" block), as arguments."""
    lines = [line.split("#", 1)[0] for line in (REPO / "README.md").read_text().splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("prefect work-pool create ")]


def test_deploy_all_registers_every_deployment_in_prefect_yaml(tmp_path):
    wanted = wanted_deployments()
    commands = readme_pool_commands()
    assert {c[2] for c in commands} == {d["work_pool"]["name"] for d in wanted.values()}  # every pool named
    stack = PrefectStack(tmp_path / "prefect-home").start()  # runs the README's first command (cnc-local)
    try:
        for args in commands:
            if args[2] != stack.pool:
                stack.cli(*args)
        stack.cli("deploy", "--all")  # from the repository root, as the README says; fails on any error
        flows = {f["id"]: f["name"] for f in post(stack.api, "flows/filter", {})}
        found = {f"{flows[d['flow_id']]}/{d['name']}": d for d in post(stack.api, "deployments/filter", {})}
    finally:
        stack.stop()
    assert sorted(found) == sorted(wanted)
    for name, d in wanted.items():
        got = found[name]
        assert got["entrypoint"] == d["entrypoint"], name
        assert got["work_pool_name"] == d["work_pool"]["name"], name
        assert got["parameters"] == d.get("parameters", {}), name
