"""The cluster and stack configuration parses and keeps its promises: token auth everywhere, loopback
locally, a NetworkPolicy on KubeRay, a non-root pinned image, and a dashboard over real metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def kuberay() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((INFRA / "kuberay/raycluster.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_kuberay_cluster_has_token_auth_and_non_root_pods_and_no_ray_client_port():
    cluster = kuberay()["RayCluster"]
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    for pod in pod_specs(cluster):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert 10001 not in [p["containerPort"] for p in c.get("ports", [])]
            assert not any("AWS_SECRET" in str(e) for e in c.get("env", []))  # secrets by reference only


def test_kuberay_network_policy_admits_only_the_cluster_the_worker_and_prometheus():
    docs = kuberay()
    cluster, policy = docs["RayCluster"], docs["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    sources = [tuple(sorted(r["from"][0]["podSelector"]["matchLabels"].items())) for r in rules]
    assert sources == [(("ray.io/cluster", "cnc"),), (("app.kubernetes.io/name", "prefect-worker"),),
                       (("app.kubernetes.io/name", "prometheus"),)]
    assert "ports" not in rules[0]  # Ray's nodes talk on many ports among themselves
    assert [p["port"] for p in rules[1]["ports"]] == [8265] and [p["port"] for p in rules[2]["ports"]] == [8080]
    assert not any("ipBlock" in src or "namespaceSelector" in src for r in rules for src in r["from"])


def test_ray_up_config_turns_token_auth_on_for_every_node():
    cfg = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert any(k.endswith("/.ray/auth_token") for k in cfg["file_mounts"])
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if cmd.split()[0:2] != ["ray", "stop"]:
            assert cmd.startswith("RAY_AUTH_MODE=token ray start"), cmd
    assert cfg["provider"]["use_internal_ips"] is True


def test_local_stack_scripts_parse_and_bind_loopback_with_a_token():
    for script in ("stack.sh", "ray-head.sh", "monitoring.sh"):
        subprocess.run(["bash", "-n", str(INFRA / "local" / script)], check=True)
    head = (INFRA / "local/ray-head.sh").read_text()
    for needle in ("export RAY_AUTH_MODE=token", "--node-ip-address 127.0.0.1", "--dashboard-host 127.0.0.1",
                   "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", "umask 077"):
        assert needle in head, needle
    stack = (INFRA / "local/stack.sh").read_text()
    assert "server start --host 127.0.0.1" in stack and "infra/local/ray-head.sh" in stack
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in stack  # the worker's drivers find the loopback head
    monitoring = (INFRA / "local/monitoring.sh").read_text()
    assert '--web.listen-address "127.0.0.1:' in monitoring and "GF_SERVER_HTTP_ADDR=127.0.0.1" in monitoring


def test_dockerfile_is_pinned_non_root_without_sudo_and_installs_from_constraints():
    text = (INFRA / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    froms = [ln for ln in instructions if ln.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE}"]
    lock = [ln for ln in (INFRA / "base-image.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lock) == 1 and re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", lock[0]), lock
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "apt-get install" not in text or "sudo" not in text.split("apt-get install", 1)[1].split("\n")[0]
    assert "rm -f /etc/sudoers.d/*" in text and "! command -v sudo" in text
    assert "-c constraints/cluster.txt" in text and "COPY constraints/cluster.txt" in text


def test_cluster_constraints_pin_what_the_project_requires():
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints/cluster.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert str(req.specifier).startswith("=="), line
            pins[req.name.lower()] = str(req.specifier)[2:]
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        name = dep.name.lower()
        if name in pins:
            assert dep.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(dep.specifier))
    assert {"torch", "ray", "prefect", "diffusers", "transformers"} <= set(pins)


def test_prometheus_config_scrapes_ray_service_discovery():
    cfg = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "ray"
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run([promtool, "check", "config", "--syntax-only",
                              str(INFRA / "prometheus/prometheus.yml")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def exported_metric_names() -> set[str]:
    """``ray_<name>`` of every Counter/Gauge/Histogram that tasks/ registers with Ray."""
    names = set()
    for path in (ROOT / "tasks").rglob("*.py"):
        for m in re.finditer(r'\b(Counter|Gauge|Histogram)\(\s*"(cnc_\w+)"', path.read_text()):
            names.add(f"ray_{m.group(2)}")
    return names


def contract_metric_names() -> set[str]:
    """Names infra/README.md promises for jobs that do not export yet (its metric table)."""
    return set(re.findall(r"`(ray_cnc_\w+)`", (INFRA / "README.md").read_text()))


def test_grafana_dashboard_queries_real_metrics_through_the_provisioned_datasource():
    dash = json.loads((INFRA / "grafana/dashboards/cnc-pipeline.json").read_text())
    ds = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exported, promised = exported_metric_names(), contract_metric_names()
    assert exported and exported <= promised  # the README lists what exists too
    used = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == ds["uid"]
            for name in re.findall(r"\b(ray_\w+)", target["expr"]):
                used.add(re.sub(r"_(bucket|count|sum)$", "", name) if name.startswith("ray_cnc_") else name)
    project = {n for n in used if n.startswith("ray_cnc_")}
    assert project <= promised, project - promised
    assert exported <= project, exported - project  # every metric the code exports has a panel
    providers = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/cnc.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "${CNC_INFRA}/grafana/dashboards"


def test_cluster_deployment_uses_the_jobs_api_and_holds_no_secret():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    (cluster,) = [d for d in deployments if d["name"] == "cluster" and "triplets" in d["entrypoint"]]
    env = cluster["work_pool"]["job_variables"]["env"]
    assert env["CNC_RAY_JOBS_ADDRESS"].startswith("http://") and "RAY_ADDRESS" not in env
    text = (ROOT / "prefect.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12,}|aws_secret|RAY_AUTH_TOKEN:", text, re.I)
