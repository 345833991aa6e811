"""Our forward of the Llama family (Llama incl. tied embeddings, Mistral, Qwen2 with qkv bias).

One module tree over the flattened token batch: every layer takes the explicit ForwardBatch.
Parameter names follow Hugging Face, so tenant deltas address modules by their HF names.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deltaserve.errors import InvalidArgumentError
from deltaserve.layers.attention import paged_attention
from deltaserve.layers.delta_linear import DeltaLinear
from deltaserve.layers.embedding import DeltaEmbedding, DeltaLMHead
from deltaserve.layers.forward_batch import ForwardBatch
from deltaserve.layers.norm import DeltaRMSNorm
from deltaserve.layers.quant import make_base_linear
from deltaserve.layers.rotary import RotaryEmbedding, apply_rotary


class _Weights:
    """Pops named tensors out of a state dict, failing clearly on missing ones."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        self.state, self.dtype, self.device = state, dtype, device

    def take(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise InvalidArgumentError(f"checkpoint is missing tensor {name}")
        return self.state.pop(name).to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.state else None

    def linear(self, name: str, quant: str) -> DeltaLinear:
        w = self.take(f"{name}.weight")
        base = make_base_linear(w, self.maybe(f"{name}.bias"), quant, self.device)
        return DeltaLinear(name, base, w.shape[0], w.shape[1])


class DecoderLayer(nn.Module):
    def __init__(self, config, idx: int, w: _Weights, quant: str, head_dim: int) -> None:
        super().__init__()
        p = f"model.layers.{idx}"
        eps = config.rms_norm_eps
        self.input_layernorm = DeltaRMSNorm(
            w.take(f"{p}.input_layernorm.weight"), eps, f"{p}.input_layernorm.weight"
        )
        self.post_attention_layernorm = DeltaRMSNorm(
            w.take(f"{p}.post_attention_layernorm.weight"), eps, f"{p}.post_attention_layernorm.weight"
        )
        self.q_proj = w.linear(f"{p}.self_attn.q_proj", quant)
        self.k_proj = w.linear(f"{p}.self_attn.k_proj", quant)
        self.v_proj = w.linear(f"{p}.self_attn.v_proj", quant)
        self.o_proj = w.linear(f"{p}.self_attn.o_proj", quant)
        self.gate_proj = w.linear(f"{p}.mlp.gate_proj", quant)
        self.up_proj = w.linear(f"{p}.mlp.up_proj", quant)
        self.down_proj = w.linear(f"{p}.mlp.down_proj", quant)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def linears(self) -> list[DeltaLinear]:
        return [
            self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_proj, self.up_proj, self.down_proj
        ]

    def forward(
        self, h: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """h: [T, hidden] residual stream -> [T, hidden]."""
        sg, dg = batch.sign_segments, batch.delta_segments
        t = h.shape[0]
        x = self.input_layernorm(h, dg)
        q = self.q_proj(x, sg, dg).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, sg, dg).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, sg, dg).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale)
        h = h + self.o_proj(a.reshape(t, self.num_heads * self.head_dim), sg, dg)
        x = self.post_attention_layernorm(h, dg)
        m = F.silu(self.gate_proj(x, sg, dg)) * self.up_proj(x, sg, dg)
        return h + self.down_proj(m, sg, dg)


class LlamaFamilyModel(nn.Module):
    """Llama / Mistral / Qwen2 causal LM over a paged KV cache."""

    def __init__(
        self, config, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
        base_quant: str = "none",
    ) -> None:
        super().__init__()
        w = _Weights(dict(state), dtype, device)
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.embed_tokens = DeltaEmbedding(w.take("model.embed_tokens.weight"))
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, w, base_quant, self.head_dim) for i in range(config.num_hidden_layers)
        )
        self.norm = DeltaRMSNorm(w.take("model.norm.weight"), config.rms_norm_eps, "model.norm.weight")
        self.tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in w.state
        if self.tied:
            w.state.pop("lm_head.weight", None)
            self.lm_head = DeltaLMHead(self.embed_tokens.weight)
        else:
            self.lm_head = DeltaLMHead(nn.Parameter(w.take("lm_head.weight"), requires_grad=False))
        self.rotary = RotaryEmbedding(config, self.head_dim).to(device)
        self.dtype = dtype

    def delta_linears(self) -> dict[str, DeltaLinear]:
        return {lin.name: lin for layer in self.layers for lin in layer.linears()}

    def norms(self) -> dict[str, DeltaRMSNorm]:
        out = {self.norm.name: self.norm}
        for layer in self.layers:
            out[layer.input_layernorm.name] = layer.input_layernorm
            out[layer.post_attention_layernorm.name] = layer.post_attention_layernorm
        return out

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Run the batch; returns fp32 logits [R, vocab] for the rows in batch.logits_index."""
        h = self.embed_tokens(batch.input_ids, batch.delta_segments)
        cos, sin = self.rotary.cos_sin(batch.positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, batch, cos, sin, k_caches[i], v_caches[i])
        h = self.norm(h[batch.logits_index], batch.logits_segments)
        return self.lm_head(h, batch.logits_segments)
