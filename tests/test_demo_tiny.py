"""The demo on a tiny base with given fine-tunes: serves, hot-loads, reuses its cache, stops cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deltaserve.cli.main import main
from deltaserve.demo.build import cached_delta, recipe
from deltaserve.demo.config import DEFAULT_TENANTS, DemoConfig, DemoTenant, default_cache
from deltaserve.errors import InvalidArgumentError


def test_default_cache_reads_the_environment_when_called(tmp_path):
    assert default_cache({"DELTASERVE_CACHE": str(tmp_path)}) == tmp_path
    assert default_cache({}) == Path.home() / ".cache" / "deltaserve"


def test_config_validation():
    with pytest.raises(InvalidArgumentError, match="fine-tune dir or a task"):
        DemoTenant("x", None)
    with pytest.raises(InvalidArgumentError, match="unique"):
        DemoConfig(cache=Path("/tmp"), tenants=(DEFAULT_TENANTS[0], DEFAULT_TENANTS[0]))
    assert {t.task for t in DEFAULT_TENANTS} == {"add", "reverse", "extract"}


def test_cached_delta_requires_the_same_recipe(tmp_path):
    t = DemoTenant("a", None, finetuned=tmp_path / "ft")
    cfg = DemoConfig(cache=tmp_path, tenants=(t,))
    (tmp_path / "a.delta.safetensors").write_bytes(b"x")
    assert cached_delta(tmp_path, t, cfg) is None  # no build record
    (tmp_path / "a.build.json").write_text(json.dumps({"recipe": recipe(t, cfg)}))
    assert cached_delta(tmp_path, t, cfg) == tmp_path / "a.delta.safetensors"
    other = DemoConfig(cache=tmp_path, tenants=(t,), distill_steps=cfg.distill_steps + 1)
    assert cached_delta(tmp_path, t, other) is None


@pytest.mark.slow
def test_demo_serves_hot_loads_and_reuses_cache(tiny_dir, tmp_path, capsys):
    base, ft = tiny_dir("llama")
    argv = [
        "demo",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--base",
        str(base),
        "--tenant",
        f"alpha={ft}",
        "--tenant",
        f"beta={ft}",
        "--json",
    ]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.split("demo finished", 1)[1].split("\n", 1)[1])
    assert [t["tenant"] for t in first["tenants"]] == ["alpha", "beta"]
    assert not any(t["cached"] for t in first["tenants"])
    assert {d["tenant"] for d in first["residency"]} == {"alpha", "beta"}
    assert all(0 < d["bytes"] < first["base_bytes"] / 8 for d in first["residency"])
    assert first["server_exit_code"] == 0
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.split("demo finished", 1)[1].split("\n", 1)[1])
    assert all(t["cached"] for t in second["tenants"])
    assert second["server_exit_code"] == 0
