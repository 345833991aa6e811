"""The shipped deployment files agree with `deltaserve serve`: every flag they pass exists (and is
shown by --help), the ports they expose, probe and scrape are the ports the server binds, and
/metrics and the HTTP API bind where they can be reached from outside the container.

The Kubernetes manifests are rendered with `kubectl kustomize` when kubectl is installed (else
read file by file); the compose file is parsed as YAML (Docker itself is not needed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deltaserve.cli import serve
from deltaserve.service.auth import read_keys_file
from deltaserve.service.config import ServerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REACHABLE = ("0.0.0.0", "[::]", "::")


def serve_config(argv: list[str]) -> ServerConfig:
    """The config `deltaserve serve ARGV` would run with; every flag must be one --help shows."""
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    shown = p.format_help()
    for arg in argv:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert re.search(rf"{re.escape(flag)}\b", shown), f"{flag} is not in `deltaserve serve --help`"
    return serve.config_from_args(p.parse_args(argv))


def check_reachable(cfg: ServerConfig) -> None:
    assert cfg.bind_host in REACHABLE, "gRPC must bind all interfaces in a container"
    assert cfg.metrics_port is not None and cfg.metrics_bind_host in REACHABLE, "/metrics must be scrapeable"
    assert cfg.http_port is not None, "the deployment serves the OpenAI-compatible HTTP API"


def k8s_objects() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    return [d for f in kust["resources"] for d in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text()) if d]


def dockerfile_command(path: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = text.splitlines()
    entry = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("ENTRYPOINT ")]
    cmd = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("CMD ")]
    assert entry == [["deltaserve", "serve"]] and len(cmd) == 1
    return cmd[0]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_ports_and_healthcheck(name):
    text = (DEPLOY / name).read_text()
    cfg = serve_config(dockerfile_command(DEPLOY / name))
    check_reachable(cfg)
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert exposed == {cfg.port, cfg.http_port, cfg.metrics_port}
    assert f'"127.0.0.1:{cfg.port}", "health"' in text  # the health check asks the gRPC port


def test_compose_replicas_prometheus_and_grafana_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [n for n, s in services.items() if s.get("image", "").startswith("deltaserve")]
    assert replicas == ["replica1", "replica2"]
    configs = {n: serve_config(services[n]["command"]) for n in replicas}
    for name, cfg in configs.items():
        check_reachable(cfg)
        assert {str(cfg.port), str(cfg.http_port), str(cfg.metrics_port)} <= set(services[name]["expose"])
        published = [p.rsplit(":", 1)[1] for p in services[name]["ports"]]
        assert published == [str(cfg.http_port)]
        assert cfg.keys is not None and str(cfg.keys).startswith("/run/secrets/")
        assert cfg.keys.name in compose["secrets"]
    # HAProxy sends gRPC to each replica's gRPC port
    haproxy = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    for name, cfg in configs.items():
        assert f"server {name} {name}:{cfg.port}" in haproxy
    # Prometheus scrapes every replica's /metrics port
    volumes = services["prometheus"]["volumes"]
    prom_mount = next(v for v in volumes if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    prom = yaml.safe_load((DEPLOY / prom_mount.split(":")[0]).read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "deltaserve")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{c.metrics_port}" for n, c in configs.items()}
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # Grafana: provisioned data source and dashboard folder match the dashboard JSON
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"])
    mounts = {inside: DEPLOY / outside for outside, inside in mounts.items()}
    ds_dir = mounts["/etc/grafana/provisioning/datasources"]
    sources = [s for f in sorted(ds_dir.glob("*.yml")) for s in yaml.safe_load(f.read_text())["datasources"]]
    assert [s["uid"] for s in sources] == ["prometheus"] and sources[0]["url"] == "http://prometheus:9090"
    provider_file = mounts["/etc/grafana/provisioning/dashboards"] / "deltaserve.yml"
    providers = yaml.safe_load(provider_file.read_text())
    dash_dir = providers["providers"][0]["options"]["path"]
    dashboard = json.loads((mounts[dash_dir] / "deltaserve.json").read_text())
    ds_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert ds_var["current"]["value"] == "prometheus"


def test_k8s_manifests_agree_with_the_server():
    objs = k8s_objects()
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "deltaserve")
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    cfg = serve_config(container["args"])
    check_reachable(cfg)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port}
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == cfg.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == cfg.port
    assert container["livenessProbe"]["tcpSocket"]["port"] in ("grpc", cfg.port)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert cfg.keys is not None and str(cfg.keys.parent) in mounts
    assert str(cfg.base).startswith(next(p for p, n in mounts.items() if n == "models"))
    selector = dep["spec"]["selector"]["matchLabels"]
    services = [o for o in objs if o["kind"] == "Service" and o["spec"]["selector"] == selector]
    assert [s["metadata"]["name"] for s in services] == ["deltaserve", "deltaserve-replicas"]
    for svc in services:
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
            assert port["port"] == ports[port["targetPort"]]
    proxy = next(o for o in objs if o["kind"] == "ConfigMap" and "haproxy.cfg" in o.get("data", {}))
    assert f".svc.cluster.local:{cfg.port}" in proxy["data"]["haproxy.cfg"]


def test_keys_example_parses():
    keys = read_keys_file(DEPLOY / "keys.example.toml")
    assert {p.name for p in keys.values()} == {"ops", "acme", "globex"}
    acme = next(p for p in keys.values() if p.name == "acme")
    assert acme.may_use("acme-chat") and not acme.may_use("globex-support") and not acme.may_use(None)
    assert (acme.quota.requests_per_minute, acme.quota.tokens_per_minute) == (600, 200000)
