"""`deltaserve bench peer` (deltaserve vs a vLLM driver) and `deltaserve bench ops` (engine ops)."""

from __future__ import annotations

import contextlib
import io
import json
import stat
import sys
from pathlib import Path

from deltaserve.cli.main import main


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def _fake_driver(tmp_path: Path, outputs: str, checks: str = "") -> Path:
    """A stand-in for vLLM's interpreter speaking the driver's file protocol: it runs `checks` on
    the workload `w`, answers `outputs` (an expression of `w` and n = max_new_tokens) and reports
    every round as 2 seconds."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "w = json.load(open(sys.argv[2]))\n"
        f"{checks}"
        "n = w['max_new_tokens']\n"
        f"outs = {outputs}\n"
        "rounds = [{'seconds': 2.0, 'tokens': n * len(outs), 'tok_s': n * len(outs) / 2.0}] * w['rounds']\n"
        "json.dump({'rounds': rounds, 'outputs': outs, 'env': {}}, open(sys.argv[3], 'w'))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def test_peer_alone_reports_rounds(tmp_path):
    r = _run(["bench", "peer", "--model", "tiny", "--workdir", str(tmp_path), "--requests", "6",
              "--prompt-len", "5", "--max-new-tokens", "4", "--batch", "4", "--rounds", "2", "--json"])
    assert r["workload"]["requests"] == 6 and r["workload"]["dtype"] in ("float32", "bfloat16")
    rounds = r["deltaserve"]["rounds"]
    assert len(rounds) == 2 and all(x["tokens"] == 24 and x["tok_s"] > 0 for x in rounds)
    assert "vllm" not in r and "ratio" not in r
    from deltaserve.bench.peer.workload import CPU_FLAGS

    flags = r["machine"]["cpu_flags"]
    assert isinstance(flags, list) and set(flags) <= set(CPU_FLAGS)
    assert isinstance(r["machine"]["torch_cpu_capability"], str) and r["machine"]["torch_cpu_capability"]


def test_peer_against_a_driver(tmp_path):
    # echoes each prompt's first ids as "generated" tokens (so outputs differ from deltaserve's)
    fake = _fake_driver(tmp_path, outputs="[p[:n] + [0] * (n - len(p[:n])) for p in w['prompts']]")
    r = _run(["bench", "peer", "--model", "tiny", "--workdir", str(tmp_path), "--requests", "4",
              "--prompt-len", "6", "--max-new-tokens", "3", "--batch", "2", "--rounds", "1",
              "--vllm-python", str(fake), "--json"])
    assert r["vllm"]["median_tok_s"] == 6.0
    assert abs(r["ratio"] - r["deltaserve"]["median_tok_s"] / 6.0) < 1e-9
    assert r["identical_outputs"].endswith("/4")


def test_bench_ops_reports_linear_and_attention():
    r = _run(["bench", "ops", "--shapes", "64x32", "--rows", "1,4", "--layers", "2", "--contexts", "16,40",
              "--batch", "2", "--repeats", "2", "--json"])
    fp32 = [p for p in r["linear"] if p["dtype"] == "float32"]
    assert {p["m"] for p in fp32} == {1, 4} and all(p["torch_ms"] > 0 for p in fp32)
    assert all(p["onednn_ms"] > 0 for p in fp32)  # oneDNN runs fp32 on every x86 CPU
    assert [p["m"] for p in r["model_projections"]] == [1, 4]
    assert [p["context"] for p in r["attention"]] == [16, 40]
    assert all(p["kernel_ms"] > 0 and p["gather_sdpa_ms"] > 0 for p in r["attention"])


def test_peer_with_tenants_sends_lora_adapters_and_serves_deltas(tmp_path):
    # the stand-in driver checks the adapters it is given (PEFT files, rank, one per tenant)
    fake = _fake_driver(
        tmp_path,
        checks="import pathlib\n"
        "from safetensors import safe_open\n"
        "assert len(w['loras']) == 3 and w['max_lora_rank'] == 4, w\n"
        "for d in w['loras']:\n"
        "    cfg = json.loads((pathlib.Path(d) / 'adapter_config.json').read_text())\n"
        "    assert cfg['r'] == 4 and cfg['peft_type'] == 'LORA'\n"
        "    with safe_open(str(pathlib.Path(d) / 'adapter_model.safetensors'), 'pt') as f:\n"
        "        keys = list(f.keys())\n"
        "        names = {k.split('.')[-3] for k in keys if '.layers.0.' in k}\n"
        "        assert names == set(cfg['target_modules']) and len(names) == 7, names\n"
        "        a = [k for k in keys if k.endswith('q_proj.lora_A.weight')][0]\n"
        "        assert f.get_tensor(a).shape[0] == 4 and f.get_tensor(a).abs().sum() > 0\n",
        outputs="[[0] * n for _ in w['prompts']]",
    )
    r = _run(["bench", "peer", "--model", "tiny", "--workdir", str(tmp_path), "--requests", "6",
              "--prompt-len", "5", "--max-new-tokens", "3", "--batch", "3", "--rounds", "1",
              "--tenants", "3", "--lora-rank", "4", "--vllm-python", str(fake), "--json"])
    assert r["workload"]["tenants"] == 3 and r["workload"]["lora_rank"] == 4
    assert r["vllm"]["median_tok_s"] == 9.0  # 6 requests x 3 tokens in 2 s
    assert r["deltaserve"]["rounds"][0]["tokens"] == 18 and r["ratio"] > 0
    assert r["identical_outputs"] == "n/a"
    assert len(list((tmp_path / "tiny" / "deltas").glob("*.delta.safetensors"))) == 3
