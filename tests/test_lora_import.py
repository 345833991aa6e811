"""`deltaserve import-lora`: PEFT LoRA adapters served as deltas equal PEFT's merge_and_unload().

Adapters are built with peft on the tiny models, with random non-zero factors (PEFT starts B at
zero), saved with save_pretrained and imported; the engine's greedy tokens for the imported
tenant must equal transformers' on the merged model, token for token.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deltaserve.cli.main import main
from deltaserve.deltas.codecs import make_codec
from deltaserve.deltas.lora_import import ImportLoraConfig, import_lora
from deltaserve.engine.types import GenerationRequest
from deltaserve.errors import FailedPreconditionError, InvalidArgumentError, UnsupportedAdapterError
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_engine_support import engine, greedy, hf_greedy, load_delta, random_prompts, run, token_ids
from tiny_models import make_checkpoint
from transformers import AutoModelForCausalLM

NEW = 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int = 0, std: float = 0.1, **lora):
    """A PEFT LoRA on `base` with random non-zero factors, saved to `out`; returns the PeftModel."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    pm.save_pretrained(out)
    return pm


def merged_greedy(pm, out: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy tokens on PEFT's merge_and_unload() of `pm` (saved to `out`)."""
    pm.merge_and_unload().save_pretrained(out)
    return hf_greedy(out, prompts, NEW)


def served_greedy(base: Path, delta: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The engine's greedy tokens for the tenant `delta`, all prompts in one batch."""
    eng = engine(base)
    eng.load_delta("lora", load_delta(base, delta))
    reqs = [
        GenerationRequest(f"r{i}", tuple(p), greedy(NEW), delta_key="lora") for i, p in enumerate(prompts)
    ]
    outs = run(eng, reqs)
    return [token_ids(outs[f"r{i}"]) for i in range(len(prompts))]


CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL)),
    "rslora": (
        "qwen2",
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    ),
    # a subset of modules in one layer; PEFT resets fan_in_fan_out to False on nn.Linear (llama)
    "subset-tied": (
        "llama-tied",
        dict(
            r=4,
            lora_alpha=16,
            target_modules=["o_proj", "down_proj"],
            layers_to_transform=[1],
            fan_in_fan_out=True,
        ),
    ),
    "rank-alpha-pattern": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=ALL,
            rank_pattern={"layers.0.mlp.up_proj": 8, "k_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 32},
        ),
    ),
    "regex-target": (
        "mistral",
        dict(
            r=6,
            lora_alpha=6,
            target_modules=r".*\.layers\.1\.(mlp|self_attn)\..*_proj",
            exclude_modules=["o_proj"],
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_served_lora_equals_peft_merge(case, tiny_dir, tmp_path):
    arch, lora = CASES[case]
    base, _ = tiny_dir(arch)
    pm = make_adapter(base, tmp_path / "adapter", seed=len(case), **lora)
    out = tmp_path / "t.delta.safetensors"
    report = import_lora(ImportLoraConfig(base=base, adapter=tmp_path / "adapter", out=out, progress=False))
    assert report.exact and report.codec == "lowrank"
    assert report.modules == sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    prompts = random_prompts([6, 11, 3, 8], seed=4)
    served = served_greedy(base, out, prompts)
    ref = merged_greedy(pm, tmp_path / "merged", prompts)
    assert served == ref
    assert ref != hf_greedy(base, prompts, NEW)  # the adapter changes the outputs


def test_rank_pattern_pads_to_the_largest_rank_with_zeros(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    pm = make_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                      rank_pattern={"layers.1.mlp.down_proj": 6})
    out = tmp_path / "t.delta.safetensors"
    report = import_lora(ImportLoraConfig(base=base, adapter=tmp_path / "a", out=out, progress=False))
    assert report.ranks == {"2": 3, "6": 1} and report.codec_params["rank"] == 6
    delta = load_delta(base, out)
    for layer in (0, 1):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            module = pm.base_model.model.model.layers[layer].get_submodule(name)
            want = module.get_delta_weight("default")
            got = delta.linears[f"model.layers.{layer}.{name}"]
            assert got.a.shape[0] == 6
            torch.testing.assert_close(got.decode(), want, rtol=1e-6, atol=1e-7)


def test_raw_codec_is_exact_and_bitdelta_compresses_peft_merged_delta(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    adapter = tmp_path / "a"
    pm = make_adapter(base, adapter, seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    raw, bit = tmp_path / "raw.delta.safetensors", tmp_path / "bit.delta.safetensors"
    import_lora(ImportLoraConfig(base, adapter, raw, make_codec("raw", {"dtype": "float32"}), progress=False))
    report = import_lora(ImportLoraConfig(base, adapter, bit, make_codec("bitdelta"), progress=False))
    assert not report.exact and report.codec == "bitdelta"
    codec = make_codec("bitdelta")
    decoded = load_delta(base, bit)
    assert sorted(decoded.linears) == sorted(
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.gate_proj")
    )
    for name, d in decoded.linears.items():
        peft_delta = pm.base_model.model.get_submodule(name).get_delta_weight("default")
        parts = codec.encode(peft_delta, key=name)
        want = codec.load(parts, *peft_delta.shape, key=name, dtype=torch.float32)
        assert torch.equal(d.decode(), want.decode())
    prompts = random_prompts([5, 9], seed=8)
    assert served_greedy(base, raw, prompts) == merged_greedy(pm, tmp_path / "merged", prompts)


def test_fan_in_fan_out_reads_factors_transposed(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    pm = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])  # q_proj: 64 x 64
    _edit_config(tmp_path / "a", fan_in_fan_out=True)
    out = tmp_path / "t.delta.safetensors"
    import_lora(ImportLoraConfig(base=base, adapter=tmp_path / "a", out=out, progress=False))
    name = "model.layers.0.self_attn.q_proj"
    want = pm.base_model.model.get_submodule(name).get_delta_weight("default").T
    torch.testing.assert_close(load_delta(base, out).linears[name].decode(), want, rtol=1e-6, atol=1e-7)
    make_adapter(base, tmp_path / "b", r=4, lora_alpha=8, target_modules=["k_proj"])  # 32 x 64
    _edit_config(tmp_path / "b", fan_in_fan_out=True)
    match = r"\[64, 32\] but the base weight is \[32, 64\].*fan_in_fan_out"
    with pytest.raises(FailedPreconditionError, match=match):
        import_lora(ImportLoraConfig(base=base, adapter=tmp_path / "b", out=out, progress=False))


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def _edit_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _refused(base: Path, adapter: Path, out: Path, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        import_lora(ImportLoraConfig(base=base, adapter=adapter, out=out, progress=False))
    assert not out.exists()


def test_refusals_name_their_cause(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    out = tmp_path / "t.delta.safetensors"

    make_adapter(base, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    _refused(base, tmp_path / "dora", out, UnsupportedAdapterError, r"use_dora is set: DoRA")
    _edit_config(tmp_path / "dora", use_dora=False)  # the magnitude vectors still give it away
    _refused(base, tmp_path / "dora", out, UnsupportedAdapterError, r"DoRA magnitude vector")

    make_adapter(base, tmp_path / "head", r=4, target_modules=["q_proj", "lm_head"])
    _refused(base, tmp_path / "head", out, UnsupportedAdapterError, r"LoRA on lm_head, outside the decoder")

    make_adapter(base, tmp_path / "emb", r=4, target_modules=["q_proj", "embed_tokens"])
    _refused(base, tmp_path / "emb", out, UnsupportedAdapterError, r"embed_tokens is a LoRA on an embedding")

    make_adapter(base, tmp_path / "save", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _refused(base, tmp_path / "save", out, UnsupportedAdapterError, r"modules_to_save is set")

    make_adapter(base, tmp_path / "ia3", r=4, target_modules=["q_proj"])
    _edit_config(tmp_path / "ia3", peft_type="IA3")
    _refused(base, tmp_path / "ia3", out, UnsupportedAdapterError, r"only LoRA adapters .* 'IA3'")

    make_adapter(base, tmp_path / "pissa", r=4, target_modules=["q_proj"])
    _edit_config(tmp_path / "pissa", init_lora_weights="pissa_niter_4")
    _refused(base, tmp_path / "pissa", out, UnsupportedAdapterError, r"modified at initialisation")


def test_refusals_of_names_and_shapes(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    out = tmp_path / "t.delta.safetensors"

    def rename(t):  # a module the base does not have, and that target_modules names
        for k in [k for k in t if "layers.0.self_attn.q_proj" in k]:
            t[k.replace("q_proj", "x_proj")] = t.pop(k)

    make_adapter(base, tmp_path / "unknown", r=4, target_modules=["q_proj"])
    _edit_tensors(tmp_path / "unknown", rename)
    _edit_config(tmp_path / "unknown", target_modules=["q_proj", "x_proj"])
    _refused(base, tmp_path / "unknown", out, UnsupportedAdapterError, r"self_attn.x_proj matches no module")

    make_adapter(base, tmp_path / "untargeted", r=4, target_modules=["q_proj", "v_proj"])
    _edit_config(tmp_path / "untargeted", target_modules=["q_proj"])
    _refused(base, tmp_path / "untargeted", out, UnsupportedAdapterError, r"v_proj, which target_modules")

    make_adapter(base, tmp_path / "partial", r=4, target_modules=["q_proj"])
    _edit_tensors(tmp_path / "partial", lambda t: [t.pop(k) for k in list(t) if "layers.1." in k])
    _refused(base, tmp_path / "partial", out, InvalidArgumentError, r"no weights for .*layers.1.self_attn.q")

    make_adapter(base, tmp_path / "rank", r=4, target_modules=["q_proj"])
    _edit_config(tmp_path / "rank", r=2)
    _refused(base, tmp_path / "rank", out, InvalidArgumentError, r"rank 4 but adapter_config.json .* r=2")

    other = make_checkpoint(tmp_path / "other-base", "llama", intermediate_size=80)
    make_adapter(other, tmp_path / "other", r=4, target_modules=["up_proj"])
    _refused(base, tmp_path / "other", out, FailedPreconditionError, r"up_proj: .*\[80, 64\].*\[96, 64\]")


def test_trained_biases_are_refused_untouched_ones_ignored(tiny_dir, tmp_path):
    base, _ = tiny_dir("qwen2")  # q/k/v biases
    out = tmp_path / "t.delta.safetensors"
    pm = make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "k_proj"], bias="all")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    # bias="all" saves every bias in full, equal to the base's: of LoRA layers and of the others
    assert any(k.endswith("q_proj.base_layer.bias") for k in saved)
    assert any(k.endswith("v_proj.bias") for k in saved)
    import_lora(ImportLoraConfig(base=base, adapter=tmp_path / "a", out=out, progress=False))
    prompts = random_prompts([7, 4], seed=2)
    assert served_greedy(base, out, prompts) == merged_greedy(pm, tmp_path / "m", prompts)
    out.unlink()

    def train_bias(t):
        key = next(k for k in t if k.endswith("layers.0.self_attn.k_proj.base_layer.bias"))
        t[key] = t[key] + 0.01

    _edit_tensors(tmp_path / "a", train_bias)
    _refused(base, tmp_path / "a", out, UnsupportedAdapterError, r"trained the bias .*k_proj.bias \(bias=")


def test_cli_json_summary_and_errors(tiny_dir, tmp_path, capsys):
    base, _ = tiny_dir("llama")
    adapter = tmp_path / "a"
    make_adapter(base, adapter, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    out = tmp_path / "t.delta.safetensors"
    argv = ["import-lora", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] is True and report["codec"] == "lowrank" and report["modules"] == 4
    assert report["codec_params"] == {"rank": 4, "dtype": "float32", "svd": "exact"}
    assert report["scalings"] == [4.0] and report["use_rslora"] is True  # 8 / sqrt(4)
    assert report["file_bytes"] == out.stat().st_size

    assert main(["inspect", str(out), "--base", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["codec"] == "lowrank"

    assert main([*argv, "--codec", "bitdelta"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "codec bitdelta" in text and "lossy" in text

    assert main([*argv, "--rank", "2"]) == 2
    assert "--rank and --svd do not apply" in capsys.readouterr().err
    assert main([*argv, "--drop-rate", "0.5"]) == 2
    assert "does not take drop_rate" in capsys.readouterr().err


def test_cli_refusal_is_one_line_without_traceback(tiny_dir, tmp_path):
    base, _ = tiny_dir("llama")
    make_adapter(base, tmp_path / "head", r=4, target_modules=["lm_head"])
    out = tmp_path / "t.delta.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "deltaserve.cli.main", "import-lora", "--base", str(base),
         "--adapter", str(tmp_path / "head"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("deltaserve import-lora: error: adapter has a LoRA on lm_head")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
