"""Our forward of the Llama family (Llama incl. tied embeddings, Mistral, Qwen2 with qkv bias).

One module tree over the flattened token batch: every layer takes the explicit ForwardBatch.
Parameter names follow Hugging Face, so tenant deltas address modules by their HF names.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.errors import InvalidArgumentError
from deltaserve.kernels import fused
from deltaserve.kernels.cpu_ext import CpuKernelConfig
from deltaserve.layers.attention import paged_attention
from deltaserve.layers.delta_linear import DeltaLinear, FusedLinear
from deltaserve.layers.embedding import DeltaEmbedding, DeltaLMHead
from deltaserve.layers.forward_batch import ForwardBatch
from deltaserve.layers.norm import DeltaRMSNorm
from deltaserve.layers.quant import make_base_linear, resolve_linear_backend
from deltaserve.layers.rotary import RotaryEmbedding
from deltaserve.layers.slots import DeltaSlotModule


class _Weights:
    """Pops named tensors out of a state dict, failing clearly on missing ones."""

    def __init__(
        self, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, quant: str,
        backend: str, cpu_kernels: CpuKernelConfig,
    ) -> None:
        self.state, self.dtype, self.device = state, dtype, device
        self.quant, self.backend, self.cpu_kernels = quant, backend, cpu_kernels

    def take(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise InvalidArgumentError(f"checkpoint is missing tensor {name}")
        return self.state.pop(name).to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.take(name) if name in self.state else None

    def fused(self, names: list[str]) -> FusedLinear:
        """One base GEMM over the HF modules `names` (same input), one DeltaLinear per module."""
        ws = [self.take(f"{n}.weight") for n in names]
        bs = [self.maybe(f"{n}.bias") for n in names]
        if any(b is not None for b in bs):
            bs = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                  for b, w in zip(bs, ws, strict=True)]
            bias = torch.cat(bs)
        else:
            bias = None
        weight = ws[0] if len(ws) == 1 else torch.cat(ws)
        base = make_base_linear(weight, bias, self.quant, self.device, self.backend)
        parts = [DeltaLinear(n, w.shape[0], w.shape[1]) for n, w in zip(names, ws, strict=True)]
        return FusedLinear(base, parts, self.cpu_kernels)


class DecoderLayer(nn.Module):
    def __init__(self, config, idx: int, w: _Weights, head_dim: int) -> None:
        super().__init__()
        p = f"model.layers.{idx}"
        eps = config.rms_norm_eps
        self.input_layernorm = DeltaRMSNorm(
            w.take(f"{p}.input_layernorm.weight"), eps, f"{p}.input_layernorm.weight"
        )
        self.post_attention_layernorm = DeltaRMSNorm(
            w.take(f"{p}.post_attention_layernorm.weight"), eps, f"{p}.post_attention_layernorm.weight"
        )
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        self.qkv_proj = w.fused([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"])
        self.o_proj = w.fused([f"{attn}.o_proj"])
        self.gate_up_proj = w.fused([f"{mlp}.gate_proj", f"{mlp}.up_proj"])
        self.down_proj = w.fused([f"{mlp}.down_proj"])
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.inter = config.intermediate_size

    def projections(self) -> list[FusedLinear]:
        return [self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj]

    def forward(
        self, h: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """h: [T, hidden] residual stream -> [T, hidden]."""
        sg, dg, sp = batch.sign_segments, batch.delta_segments, batch.sign_passes
        t = h.shape[0]
        x = self.input_layernorm(h, dg)
        qkv = self.qkv_proj(x, sg, dg, sp)  # [T, q + 2 kv]
        # rotate q and k heads in one pass: [T, Hq + Hkv, D]
        qk = fused.rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        a = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale)
        h = h + self.o_proj(a.reshape(t, self.q_size), sg, dg, sp)
        x = self.post_attention_layernorm(h, dg)
        gate_up = self.gate_up_proj(x, sg, dg, sp)  # [T, 2 inter]
        m = fused.silu_and_mul(gate_up)
        return h + self.down_proj(m, sg, dg, sp)


class LlamaFamilyModel(nn.Module):
    """Llama / Mistral / Qwen2 causal LM over a paged KV cache."""

    def __init__(
        self, config, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
        base_quant: str = "none", linear_backend: str = "auto", lut_table_bits: int | None = None,
    ) -> None:
        """linear_backend: "auto", "torch" or "onednn" (see layers.quant.resolve_linear_backend);
        the lm_head, never quantized, resolves it for the unquantized case. lut_table_bits: the
        CPU 1-bit kernel's table precision (CpuKernelConfig.table_bits; None = by dtype)."""
        super().__init__()
        self.linear_backend = resolve_linear_backend(linear_backend, device, dtype, base_quant)
        head_backend = resolve_linear_backend(linear_backend, device, dtype, "none")
        w = _Weights(dict(state), dtype, device, base_quant, self.linear_backend,
                     CpuKernelConfig(table_bits=lut_table_bits))
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.embed_tokens = DeltaEmbedding(w.take("model.embed_tokens.weight"))
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, w, self.head_dim) for i in range(config.num_hidden_layers)
        )
        self.norm = DeltaRMSNorm(w.take("model.norm.weight"), config.rms_norm_eps, "model.norm.weight")
        self.tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in w.state
        if self.tied:
            w.state.pop("lm_head.weight", None)
            self.lm_head = DeltaLMHead(self.embed_tokens.weight, head_backend)
        else:
            head = nn.Parameter(w.take("lm_head.weight"), requires_grad=False)
            self.lm_head = DeltaLMHead(head, head_backend)
        self.rotary = RotaryEmbedding(config, self.head_dim).to(device)
        self.dtype = dtype

    def projections(self) -> list[FusedLinear]:
        """Every base projection (fused GEMM) of the blocks."""
        return [proj for layer in self.layers for proj in layer.projections()]

    def delta_linears(self) -> dict[str, DeltaLinear]:
        """The delta slot owners of the block linears, by HF module name."""
        return {part.name: part for proj in self.projections() for part in proj.parts}

    def delta_modules(self) -> dict[str, DeltaSlotModule]:
        """Every delta-carrying module by the delta name it takes (layers/slots.py): linear
        deltas by HF module name, their bias deltas as "<module>.bias", embedding, lm_head and
        norm deltas by HF parameter name."""
        out: dict[str, DeltaSlotModule] = {
            "model.embed_tokens.weight": self.embed_tokens, "lm_head.weight": self.lm_head, **self.norms()
        }
        for name, lin in self.delta_linears().items():
            out[name] = lin
            out[f"{name}.bias"] = lin
        return out

    @torch.inference_mode()
    def replace_base_weights(self, state: dict[str, torch.Tensor]) -> str | None:
        """Overwrite every base weight with the same-named tensor of `state` (HF names).

        Returns the first problem (missing tensor, other shape) without changing anything,
        or None once all weights are replaced. Unquantized bases only.
        """
        plain: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed_tokens.weight}
        if not self.tied:
            plain["lm_head.weight"] = self.lm_head.weight
        for name, norm in self.norms().items():
            plain[name] = norm.weight
        wanted = {name: tuple(t.shape) for name, t in plain.items()}
        for proj in self.projections():
            for part in proj.parts:
                wanted[f"{part.name}.weight"] = (part.out_features, part.in_features)
        for name, shape in wanted.items():
            if name not in state or tuple(state[name].shape) != shape:
                return f"tensor {name} is missing or has another shape"
        for name, t in plain.items():
            t.copy_(state[name])
        self.lm_head.refresh()
        dtype = self.dtype
        for proj in self.projections():
            weight = torch.cat([state[f"{p.name}.weight"] for p in proj.parts]).to(dtype)
            biases = [state.get(f"{p.name}.bias") for p in proj.parts]
            bias = None
            if any(b is not None for b in biases):
                parts = zip(proj.parts, biases, strict=True)
                bias = torch.cat([torch.zeros(p.out_features) if b is None else b for p, b in parts])
                bias = bias.to(dtype)
            proj.set_base_weight(weight, bias)
        return None

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
