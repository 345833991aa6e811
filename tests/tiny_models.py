"""Tiny random Llama-family checkpoints for tests (built from configs; no downloads).

`make_checkpoint(dir, arch)` writes a Hugging Face checkpoint directory (config.json
+ model.safetensors + a tiny tokenizer); `make_finetune(base_dir, out_dir)` writes a
perturbed copy of it, as a stand-in for a real fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHES = ("llama", "mistral", "qwen2", "llama-tied")
VOCAB = 128


def tiny_config(arch: str, **overrides):
    """A 2-layer config of the named architecture (hidden 64, GQA 4/2 heads)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return AutoConfig.for_model("llama", tie_word_embeddings=False, **common)
    if arch == "llama-tied":
        return AutoConfig.for_model("llama", tie_word_embeddings=True, **common)
    if arch == "mistral":
        return AutoConfig.for_model("mistral", tie_word_embeddings=False, sliding_window=None, **common)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", tie_word_embeddings=False, use_sliding_window=False, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHES}")


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer over VOCAB ids ("t0" ... ), enough for encode/decode round trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, VOCAB):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


def make_checkpoint(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random tiny model of `arch` to `out` and return `out`."""
    out = Path(out)
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(1.0)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out)
    return out


def make_finetune(
    base: Path, out: Path, seed: int = 1, scale: float = 0.02, dense: bool = False
) -> Path:
    """Perturb every block linear of `base` (and, with dense=True, embeddings/norms too)."""
    base, out = Path(base), Path(out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_block_linear = ".layers." in name and name.endswith("proj.weight")
            if is_block_linear or (dense and ("embed" in name or "norm" in name or "lm_head" in name)):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
