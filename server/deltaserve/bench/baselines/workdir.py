"""Models and tenants for the serving benchmark, built once in a work directory.

Layout (reused when present, keyed by the model spec):

    <workdir>/<model>/base/                     HF checkpoint of the base
    <workdir>/<model>/deltas/<tenant>.delta.safetensors   1-bit (bitdelta) deltas
    <workdir>/<model>/merged/<tenant>/          base + delta merged (swap, merged, hf serve these)

Fine-tunes are synthetic: every block linear of the base plus Gaussian noise of
`noise` × its weights' standard deviation (seeded per tenant), compressed with the
bitdelta codec; the merged checkpoints are base + the *compressed* delta, so every
mode serves exactly the same weights and must return the same greedy text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

MODELS = ("tiny", "smollm2", "llama-large")


@dataclass(frozen=True)
class Prepared:
    base: Path
    deltas: Path
    merged: Path
    tenants: tuple[str, ...]

    def checkpoints(self, tenants: tuple[str, ...] | None = None) -> dict[str, Path]:
        """tenant -> merged checkpoint ("" = the base)."""
        names = self.tenants if tenants is None else tenants
        return {"": self.base, **{t: self.merged / t for t in names}}


def tenant_names(n: int, prefix: str = "t") -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(n))


def _word_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer over `vocab` ids ("w4" ...), enough for encode/decode round trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


def _random_llama(out: Path, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 / hidden**0.5 if p.ndim == 2 else 0.0)
            if "norm" in name:
                p.fill_(1.0)
    model.save_pretrained(out, safe_serialization=True)
    _word_tokenizer(out, vocab)


def build_base(model: str, out: Path) -> None:
    """Write the base checkpoint of `model` (one of MODELS) to `out`."""
    if model == "tiny":
        # small enough for the 5-minute CI run, big enough that the forward is not all overhead
        _random_llama(out, hidden=256, inter=640, layers=4, heads=8, kv=4, vocab=512)
    elif model == "llama-large":
        # random weights, 2048 hidden: the block linears dominate the step time
        _random_llama(out, hidden=2048, inter=5632, layers=4, heads=16, kv=4, vocab=512)
    elif model == "smollm2":
        from deltaserve.models.gguf_import import embedded_gguf_path, import_gguf

        import_gguf(embedded_gguf_path(), out, verify_tokens=0)
    else:
        raise ValueError(f"unknown benchmark model {model!r}; choose from {', '.join(MODELS)}")


def _finetune(base: Path, out: Path, seed: int, noise: float) -> None:
    from deltaserve.deltas.layout import is_block_linear
    from deltaserve.models.checkpoint import load_state_dict, read_config_dict, save_checkpoint

    state = load_state_dict(base)
    gen = torch.Generator().manual_seed(seed)
    for name, w in state.items():
        if is_block_linear(name, w.ndim):
            w32 = w.to(torch.float32)
            state[name] = (w32 + torch.randn(w.shape, generator=gen) * (noise * w32.std())).to(w.dtype)
    save_checkpoint(state, read_config_dict(base), out, tokenizer_from=base)


CODECS = {"bitdelta": ("bitdelta", {}), "bitdelta-mb1": ("bitdelta-mb", {"magnitude_bits": 1}),
          "bitdelta-mb2": ("bitdelta-mb", {"magnitude_bits": 2}),
          "bitdelta-mb2-additive": ("bitdelta-mb", {"magnitude_bits": 2, "levels": "additive"}),
          "dare-p0.9": ("dare", {"drop_rate": 0.9})}


def prepare(
    workdir: Path, model: str, tenants: tuple[str, ...], merged: bool, noise: float = 0.05,
    codec: str = "bitdelta",
) -> Prepared:
    """Build (or reuse) the base, a delta per tenant (`codec`, a key of CODECS) and, if `merged`,
    the merged checkpoints."""
    from deltaserve.deltas.codecs import make_codec

    root = Path(workdir) / model
    base = root / "base"
    deltas = root / ("deltas" if codec == "bitdelta" else f"deltas-{codec}")
    merged_dir = root / ("merged" if codec == "bitdelta" else f"merged-{codec}")
    return _prepare(root, base, deltas, merged_dir, model, tenants, merged, noise, make_codec(*CODECS[codec]))


def _prepare(root, base, deltas, merged_dir, model, tenants, merged, noise, codec) -> Prepared:
    from deltaserve.deltas.compress import CompressConfig, compress
    from deltaserve.deltas.merge import merge

    if not (base / "config.json").is_file():
        if base.exists():
            shutil.rmtree(base)
        build_base(model, base)
    deltas.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps({"model": model, "noise": noise}))
    todo = [t for t in tenants if not (deltas / f"{t}.delta.safetensors").is_file()]
    todo += [
        t for t in tenants if merged and not (merged_dir / t / "config.json").is_file() and t not in todo
    ]
    for t in tqdm(todo, desc=f"tenants ({model})", unit="tenant", disable=not todo):
        delta = deltas / f"{t}.delta.safetensors"
        if not delta.is_file():
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                ft = Path(tmp) / "ft"
                _finetune(base, ft, seed=1000 + tenants.index(t), noise=noise)
                compress(CompressConfig(base, ft, delta, codec, progress=False))
        if merged and not (merged_dir / t / "config.json").is_file():
            if (merged_dir / t).exists():
                shutil.rmtree(merged_dir / t)
            merge(base, delta, merged_dir / t, progress=False)
    return Prepared(base, deltas, merged_dir, tuple(tenants))
