"""The committed gRPC stubs must be exactly what scripts/gen_proto.py generates now."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "client" / "deltaserve_client" / "_proto"


def _load_gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_regenerated(tmp_path):
    gen_proto = _load_gen_proto()
    gen_proto.generate(tmp_path)
    fresh, committed = _tree(tmp_path), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "stub file set differs: run `make proto` and commit"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"


def test_stubs_use_relative_imports_only():
    for path in COMMITTED.rglob("*.py*"):
        assert "from deltaserve.v1" not in path.read_text(), path


def test_stubs_round_trip_in_fresh_interpreter(tmp_path):
    """The stubs load in a fresh interpreter and round-trip a request with optional fields."""
    code = (
        "from deltaserve_client._proto.deltaserve.v1 import generation_pb2 as g, deltas_pb2_grpc\n"
        "r = g.GenerateRequest(tenant='t', prompt='hi', alpha=0.0)\n"
        "r2 = g.GenerateRequest.FromString(r.SerializeToString())\n"
        "assert r2.HasField('alpha') and r2.alpha == 0.0 and r2.WhichOneof('input') == 'prompt'\n"
        "assert not g.GenerateRequest().HasField('alpha')\n"
        "assert deltas_pb2_grpc.DeltasStub\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
