"""ServerConfig (file + flag overrides, validation) and the API keys file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from deltaserve.errors import InvalidArgumentError
from deltaserve.service.auth import Authenticator, PermissionDeniedError, UnauthenticatedError
from deltaserve.service.config import ServerConfig, parse_bytes


def test_toml_and_yaml_with_flag_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'base = "models/b"\n[cache]\ndevice_cache_bytes = "64MiB"\nhost_cache_bytes = 1000\n'
        "[limits]\nmax_queue = 7\n[engine]\nmax_running = 3\n"
    )
    c = ServerConfig.from_sources(toml, max_queue=9, port=None)
    assert c.base == tmp_path / "models/b"  # relative to the config file
    assert (c.device_cache_bytes, c.host_cache_bytes, c.max_queue, c.max_running) == (64 * 2**20, 1000, 9, 3)
    assert c.bind_host == "127.0.0.1"  # no keys file: loopback
    yaml = tmp_path / "c.yaml"
    yaml.write_text("server:\n  base: /abs/b\n  keys: k.toml\n  port: 6000\n")
    c = ServerConfig.from_sources(yaml, dtype="bfloat16")
    assert c.base == Path("/abs/b") and c.keys == tmp_path / "k.toml" and c.port == 6000
    assert c.dtype == "bfloat16" and c.bind_host == "[::]"
    assert ServerConfig.from_sources(None, base="b", host="10.0.0.1").bind_host == "10.0.0.1"


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"unknown keys.*max_qeue"):
        ServerConfig.from_sources(None, base="b", max_qeue=3)
    with pytest.raises(InvalidArgumentError, match="base"):
        ServerConfig.from_sources(None, port=1)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        ServerConfig.from_sources(None, base="b", dtype="int3")
    with pytest.raises(InvalidArgumentError, match="max_queue"):
        ServerConfig.from_sources(None, base="b", max_queue=0)
    bad = tmp_path / "bad.toml"
    bad.write_text("base = [")
    with pytest.raises(InvalidArgumentError, match="not valid TOML"):
        ServerConfig.from_sources(bad)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        ServerConfig.from_sources(tmp_path / "missing.toml")
    assert parse_bytes("1.5 GiB") == 3 * 2**29 and parse_bytes("2kb") == 2000
    for v in ("12 parsecs", "-1", True):
        with pytest.raises(InvalidArgumentError):
            parse_bytes(v)


def test_keys_file(tmp_path):
    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(b"s3cret-admin").hexdigest()
    keys.write_text(
        "keys:\n"
        "  - {name: a, key: key-for-a-123, tenants: [x, y]}\n"
        f"  - {{name: ops, sha256: {digest}, tenants: ['*'], admin: true, base: false}}\n"
    )
    auth = Authenticator.from_file(keys)
    a = auth.authenticate([("authorization", "Bearer key-for-a-123")])
    assert a.name == "a" and a.may_use("x") and not a.may_use("z") and a.may_use(None) and not a.admin
    ops = auth.authenticate([("Authorization", b"bearer s3cret-admin")])
    assert ops.admin and ops.may_use("anything") and not ops.may_use("")
    auth.require_admin(ops)
    with pytest.raises(PermissionDeniedError, match="admin"):
        auth.require_admin(a)
    with pytest.raises(PermissionDeniedError, match="'z'"):
        auth.require_tenant(a, "z")
    for md in ([], [("authorization", "Basic abc")], [("authorization", "Bearer nope-nope")]):
        with pytest.raises(UnauthenticatedError):
            auth.authenticate(md)
    assert Authenticator.from_file(None).authenticate([]).admin  # no keys file: anonymous admin
    for text, msg in (
        ("[[key]]\nkey = 'short'\n", "at least 8"),
        ("[[key]]\nkey = 'longenough1'\nsha256 = 'ab'\n", "exactly one"),
        ("[[key]]\nkey = 'longenough1'\ntenants = 'x'\n", "tenants"),
        ("[[key]]\nkey = 'longenough1'\nrole = 'admin'\n", "unknown fields"),
        ("[[key]]\nkey = 'longenough1'\n[[key]]\nkey = 'longenough1'\n", "duplicate"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(InvalidArgumentError, match=msg):
            Authenticator.from_file(bad)
