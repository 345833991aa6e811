"""Which weights a codec compresses, and the shapes a base config implies.

Supported families: Llama (tied or untied embeddings, e.g. SmolLM2), Mistral, Qwen2
(q/k/v biases). Block linears are compressed by the codec; everything else
(embeddings, lm_head, norms, biases) travels dense when it differs from the base.
"""

from __future__ import annotations

from deltaserve.errors import InvalidArgumentError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_PROJ = {
    "self_attn.q_proj": ("q", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "q"),
    "mlp.gate_proj": ("inter", "hidden"),
    "mlp.up_proj": ("inter", "hidden"),
    "mlp.down_proj": ("hidden", "inter"),
    # fused variants some checkpoints use
    "self_attn.qkv_proj": ("qkv", "hidden"),
    "mlp.gate_up_proj": ("inter2", "hidden"),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")


def is_block_linear(name: str, ndim: int) -> bool:
    """True for the 2-D weight of a linear layer inside a decoder block (codec-compressed)."""
    return ndim == 2 and ".layers." in name and name.endswith(".weight") and "norm" not in name


def module_name(param_name: str) -> str:
    """HF module name of a weight ("...q_proj.weight" -> "...q_proj")."""
    return param_name.removesuffix(".weight")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter name a supported checkpoint may hold -> its shape, from config.json.

    Includes optional entries (biases, lm_head of tied models, fused projections); the
    caller checks names it meets against this map, not the reverse.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgumentError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        layers = int(config["num_hidden_layers"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"config.json lacks a usable architecture field: {exc}") from exc
    dims = {
        "hidden": hidden,
        "q": heads * head_dim,
        "kv": kv_heads * head_dim,
        "qkv": (heads + 2 * kv_heads) * head_dim,
        "inter": inter,
        "inter2": 2 * inter,
    }
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, (out_dim, in_dim) in _PROJ.items():
            shapes[f"{p}{proj}.weight"] = (dims[out_dim], dims[in_dim])
            shapes[f"{p}{proj}.bias"] = (dims[out_dim],)
        for norm in _NORMS:
            shapes[f"{p}{norm}.weight"] = (hidden,)
    return shapes

