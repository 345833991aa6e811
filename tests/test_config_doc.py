"""docs/CONFIG.md lists every ServerConfig key and every `deltaserve serve` flag, with the right defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from deltaserve.cli import serve
from deltaserve.service.config import DEPRECATED_KEYS, ServerConfig, parse_bytes

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
BYTE_KEYS = {"device_cache_bytes", "host_cache_bytes", "max_message_bytes"}
# flags whose dest is not the key they set
FLAG_KEY = {"no_metrics": "metrics_port", "no_warm": "warm_deltas", "no_prefix_cache": "prefix_cache"}


def table() -> list[tuple[str, list[str], str]]:
    """(key, flags, default) of every row between the config-table markers."""
    text = DOC.read_text()
    body = text.split("<!-- config-table:start -->")[1].split("<!-- config-table:end -->")[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = cells[0].strip("`")
        flags = re.findall(r"`(--[a-z-]+)`", cells[1])
        rows.append((key, flags, cells[2]))
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p


def visible_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """--flag -> dest of every option `serve --help` shows."""
    return {
        opt: a.dest
        for a in p._actions
        if a.help != argparse.SUPPRESS
        for opt in a.option_strings
        if opt.startswith("--") and opt != "--help"
    }


def test_every_key_and_flag_is_documented_once():
    rows = table()
    keys = [k for k, _, _ in rows if k]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(ServerConfig))
    documented = [f for _, flags, _ in rows for f in flags]
    assert len(documented) == len(set(documented))
    flags = visible_flags(parser())
    assert sorted(documented) == sorted(flags)
    for key, row_flags, _ in rows:
        for flag in row_flags:
            dest = flags[flag]
            assert FLAG_KEY.get(dest, dest) == (key or dest), (flag, key)


def test_documented_defaults_are_the_real_ones():
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    for key, _, cell in table():
        if not key or fields[key].default in (None, dataclasses.MISSING):
            continue
        default, shown = fields[key].default, cell.split(" ")[0]
        if key in BYTE_KEYS:
            assert parse_bytes(shown) == default, key
        elif isinstance(default, bool):
            assert shown == str(default).lower(), key
        else:
            assert type(default)(shown) == default, key


def test_former_names_still_work():
    hidden = parser().parse_args(["--base", "b", "--max-device-tenants", "3"])
    assert serve.config_from_args(hidden).tenant_slots == 3
    assert ServerConfig.from_dict({"base": "b", "max_device_tenants": 5}).tenant_slots == 5
    assert ServerConfig(base=Path("b"), max_device_tenants=2).tenant_slots == 2
    assert all(new in {f.name for f in dataclasses.fields(ServerConfig)} for new in DEPRECATED_KEYS.values())
    assert "--max-device-tenants" not in parser().format_help()


def test_metrics_and_http_bind_like_grpc_unless_told():
    argv = ["--base", "b", "--host", "0.0.0.0", "--http-port", "8000"]
    cfg = serve.config_from_args(parser().parse_args(argv))
    assert cfg.bind_host == cfg.metrics_bind_host == "0.0.0.0" and cfg.http_port == 8000
    cfg = serve.config_from_args(parser().parse_args(["--base", "b", "--metrics-host", "127.0.0.1"]))
    assert cfg.metrics_bind_host == "127.0.0.1" and cfg.http_port is None
    assert ServerConfig(base=Path("b"), keys=Path("k")).metrics_bind_host == "[::]"
