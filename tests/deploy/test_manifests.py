"""The deployment files are valid as written, checked offline.

Compose: ``docker compose config -q`` where the Compose plugin exists,
otherwise the compose-spec JSON schema that ``check-jsonschema`` ships.
Kubernetes: every manifest against the bundled schemas of one pinned
Kubernetes version in strict mode (``kubernetes-validate``). The validators
run with every proxy variable pointing at a closed port, so a validator
that tried to download a schema would fail here instead of depending on
the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAYS = DEPLOY / "k8s" / "overlays"
DASHBOARD = DEPLOY / "grafana" / "ares-dashboard.json"

#: The Kubernetes version the manifests are validated against.
K8S_VERSION = "1.30.0"

#: Every metric the workers export (ares_celery.observability).
METRICS = {
    "ares_requests_total", "ares_leases_granted_total",
    "ares_leases_lost_total", "ares_job_locks_total", "ares_commits_total",
    "ares_gpu_allocation_wait_seconds", "ares_gpu_allocations_total",
    "ares_gpus_busy",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

OFFLINE = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy":
           "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "", "no_proxy": ""}


def k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "compose", "version"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


# -- Compose ------------------------------------------------------------


def test_compose_file_is_valid(tmp_path):
    if compose_plugin():
        env = dict(OFFLINE, REDIS_PASSWORD="x", FLOWER_BASIC_AUTH="a:b")
        result = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "--profile", "gpu",
             "config", "-q"], capture_output=True, text=True, env=env,
            timeout=60)
    else:
        result = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
             "vendor.compose-spec", str(COMPOSE)],
            capture_output=True, text=True, env=OFFLINE, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path):
    """The fallback validator is not a no-op: a misspelt key fails."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace(
        "    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1))
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
         "vendor.compose-spec", str(broken)],
        capture_output=True, text=True, env=OFFLINE, timeout=120)
    assert result.returncode != 0 and "restrat" in result.stdout


def test_compose_has_the_services_and_the_gpu_profile():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"redis", "etcd-0", "etcd-1", "etcd-2", "flower"} <= set(services)
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    mocks = [s for s in services.values()
             if any("--ares-mock-gpus=" in str(a) for a in s.get("command", []))]
    assert len(mocks) == 2
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]


def test_compose_mock_topologies_exist():
    from ares_celery.gpu.mock_topologies import MOCK_TOPOLOGY_NAMES

    text = COMPOSE.read_text()
    names = re.findall(r"--ares-mock-gpus=([\w-]+)", text)
    assert names and set(names) <= set(MOCK_TOPOLOGY_NAMES)


# -- Kubernetes -----------------------------------------------------------


@pytest.mark.parametrize("path, doc", k8s_documents(),
                         ids=lambda v: v.name if isinstance(v, Path) else "")
def test_k8s_manifest_is_valid(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_is_strict():
    """An unknown field is an error, not silently ignored."""
    _, doc = next(d for d in k8s_documents() if d[1]["kind"] == "DaemonSet")
    doc = json.loads(json.dumps(doc))
    doc["spec"]["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_only_existing_ones():
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml")
                                   .read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert all((K8S_BASE / name).is_file() for name in listed), listed
    on_disk = {p.name for p in K8S_BASE.glob("*.yaml")} - {
        "kustomization.yaml"}
    assert set(listed) == on_disk


def test_overlays_point_at_the_base():
    for kustomization in K8S_OVERLAYS.glob("*/kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for resource in spec["resources"]:
            assert (kustomization.parent / resource).resolve().is_dir()


def _kind(kind: str, name: str) -> dict:
    return next(doc for _, doc in k8s_documents()
                if doc["kind"] == kind and doc["metadata"]["name"] == name)


def test_gpu_daemonset_requests_gpus_and_uses_the_node_name_as_host():
    ds = _kind("DaemonSet", "gpu-worker")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    host = next(e for e in container["env"] if e["name"] == "ARES_HOST")
    assert host["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["nodeSelector"] and any(
        t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    config = _kind("ConfigMap", "ares-config")["data"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == config["ARES_METRICS_PORT"]


def test_etcd_statefulset_forms_a_three_member_cluster():
    sts = _kind("StatefulSet", "etcd")
    assert sts["spec"]["replicas"] == 3
    service = _kind("Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    args = " ".join(sts["spec"]["template"]["spec"]["containers"][0]
                    ["command"])
    cluster = re.search(r"--initial-cluster=(\S+)", args).group(1)
    assert sorted(m.split("=")[0] for m in cluster.split(",")) == [
        "etcd-0", "etcd-1", "etcd-2"]
    assert sts["spec"]["volumeClaimTemplates"]


def test_secrets_stay_out_of_the_configmap():
    config = _kind("ConfigMap", "ares-config")["data"]
    assert not any("PASSWORD" in key or "AUTH" in key for key in config)
    flower = _kind("Deployment", "flower")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in flower["containers"][0]["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] \
        == "ares-secrets"


# -- Grafana --------------------------------------------------------------


def _exprs(node) -> list[str]:
    """Every PromQL string: panel targets and template variable queries."""
    if isinstance(node, dict):
        found = [node[k] for k in ("expr", "query", "definition")
                 if isinstance(node.get(k), str)]
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _exprs([dashboard["panels"], dashboard["templating"]])
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bares_[a-z_]+", expr):
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name[:-len(suffix)] in METRICS:
                    name = name[:-len(suffix)]
            used.add(name)
    assert used <= METRICS, used - METRICS
    assert used == METRICS, f"no panel shows {METRICS - used}"


# -- the image's app module -------------------------------------------------


def test_image_app_reads_settings_and_encodes_the_password(monkeypatch):
    """deploy/app/proj.py is what every container runs: its settings come
    from the ConfigMap/Secret variables, and a password with URL-special
    characters still yields a valid broker URL."""
    import importlib.util

    for key, value in {"REDIS_PASSWORD": "p@ss/w:rd",
                       "ARES_ETCD_ENDPOINTS": "etcd-0.etcd:2379,etcd-1.etcd:2379",
                       "ARES_ETCD_USER": "", "ARES_METRICS_PORT": "9808",
                       "ARES_LEASE_TTL": "30"}.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(
        "deploy_proj", DEPLOY / "app" / "proj.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = module.ares.settings
    assert module.app.conf.broker_url == "redis://:p%40ss%2Fw%3Ard@redis:6379/0"
    assert settings.etcd_endpoints == [("etcd-0.etcd", 2379),
                                       ("etcd-1.etcd", 2379)]
    assert settings.etcd_security.user is None   # empty Secret value: off
    assert "p%40ss" not in repr(settings)
    assert {"proj.ping", "proj.train"} <= set(module.app.tasks)
