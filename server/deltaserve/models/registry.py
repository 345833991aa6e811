"""Supported architectures and their model-family traits."""

from __future__ import annotations

from dataclasses import dataclass

from deltaserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the Llama-family architectures we run with one forward."""

    name: str
    honours_sliding_window: bool  # Mistral: config.sliding_window limits attention


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", honours_sliding_window=False),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", honours_sliding_window=True),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", honours_sliding_window=False),
}


def arch_spec(config) -> ArchSpec:
    """The spec of a HF config's architecture; InvalidArgumentError listing the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise InvalidArgumentError(
        f"unsupported architecture {names[0] if names else config.model_type!r}; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def sliding_window(config, spec: ArchSpec) -> int | None:
    """Attention window in tokens, or None for full attention."""
    if spec.honours_sliding_window:
        return getattr(config, "sliding_window", None) or None
    if getattr(config, "use_sliding_window", False):
        raise InvalidArgumentError(f"{spec.name} with use_sliding_window=True is not supported")
    return None
