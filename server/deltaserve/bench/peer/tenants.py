"""Tenants of the peer benchmark's multi-tenant workload.

deltaserve serves full fine-tunes as 1-bit deltas (bitdelta, built by bench serve's workdir:
the base plus Gaussian noise on every block linear, compressed); vLLM serves LoRA adapters of
the same base, which is what it can batch across tenants. The adapters are written here in
PEFT's on-disk format (adapter_config.json + adapter_model.safetensors) with random non-zero
factors, rank `rank` on all seven block projections, so vLLM's LoRA path does its full work.
"""

from __future__ import annotations

import json
from pathlib import Path

PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every block projection of a Llama-family config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    return {
        "q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }


def write_lora_adapters(base: Path, out: Path, n: int, rank: int = 16, seed: int = 0) -> list[Path]:
    """`n` PEFT LoRA adapters of `base` under `out` (reused when present); their directories."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    shapes = projection_shapes(config)
    dirs = []
    for t in range(n):
        d = out / f"lora-r{rank}-{t:02d}"
        dirs.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed + t)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for block, names in PROJECTIONS.items():
                for name in names:
                    n_out, n_in = shapes[name]
                    prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                    tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
                    tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(base),
            "target_modules": [m for names in PROJECTIONS.values() for m in names],
        }, indent=2))
    return dirs


def bitdelta_tenants(workdir: Path, model: str, n: int) -> list[Path]:
    """`n` 1-bit full-fine-tune deltas of bench serve's `model` in `workdir` (built when missing)."""
    from deltaserve.bench.baselines.workdir import prepare, tenant_names

    prep = prepare(workdir, model, tenant_names(n), merged=False)
    return [prep.deltas / f"{t}.delta.safetensors" for t in prep.tenants]
