"""Rotary position embedding (RoPE), frequencies from transformers' rope utilities.

The rotation itself is kernels.fused.rotary (a CPU kernel, or the plain-torch reference).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class RotaryEmbedding(nn.Module):
    """cos/sin tables from a HF config for the positions of a batch."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        params = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(params["rope_theta"], head_dim), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = float(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int64 [T] -> cos, sin: [T, head_dim] (computed in fp32 as transformers does)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)
        sin = (emb.sin() * self.scaling).to(dtype)
        return cos, sin
