"""deploy/grafana/dashboards/deltaserve.json: well formed, and every metric (and label) its queries use
is in a live /metrics scrape of a server that served gRPC and HTTP traffic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from deltaserve_client import SamplingOptions
from test_metrics_scrape import scrape
from test_service_support import PROMPTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "deltaserve.json"
METRIC = re.compile(r"\bdeltaserve:[a-zA-Z0-9_:]+")
BY = re.compile(r"\bby \(([^)]*)\)")
MATCHER = re.compile(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
ADDED_BY_PROMETHEUS = {"instance", "job", "le"}


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    all_panels = panels(dash)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "instance", "topk"}
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
    exprs = queries(dash)
    assert len(exprs) >= 25
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
        assert used <= variables, expr
    titles = " ".join(p["title"].lower() for p in all_panels)
    for topic in ("status code", "first token", "inter-token", "end-to-end", "tokens / s", "running",
                  "kv cache", "resident", "hit ratio", "evictions", "load latency", "by tenant"):
        assert topic in titles, topic


def test_every_queried_metric_and_label_is_scraped(models):
    srv = ServerThread(config_for(models, http_port=0))
    try:
        sampling = SamplingOptions(max_new_tokens=4, ignore_eos=True)
        with srv.client() as c:
            for tenant in ("", "alice", "bob"):
                c.generate(PROMPTS[0], tenant=tenant, sampling=sampling)
        http = f"http://127.0.0.1:{srv.server.http_port}/v1/completions"
        r = httpx.post(
            http,
            json={"model": "carol", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200
        assert httpx.post(http, json={}, timeout=60).status_code == 400
        sample = scrape(srv.server.metrics_port)
    finally:
        srv.stop()
    labels_of: dict[str, set[str]] = {}
    for key in sample:
        name, _, rest = key.partition("{")
        labels_of.setdefault(name, set()).update(re.findall(r'(\w+)="', rest))
    for expr in queries(json.loads(DASHBOARD.read_text())):
        names = set(METRIC.findall(expr))
        assert names, expr
        missing = names - set(labels_of)
        assert not missing, f"{expr}: {sorted(missing)} not in the scrape"
        labels = {lab.strip() for group in BY.findall(expr) for lab in group.split(",")}
        labels |= set(MATCHER.findall(expr))
        have = set().union(*(labels_of[n] for n in names)) | ADDED_BY_PROMETHEUS
        assert labels <= have, f"{expr}: labels {sorted(labels - have)} not on {sorted(names)}"
