"""Base linear layers: plain torch, or bitsandbytes 8-bit / 4-bit (NF4) quantized."""

from __future__ import annotations

import torch
from torch import nn

BASE_QUANTS = ("none", "int8", "nf4")


def make_base_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quant: str, device: torch.device
) -> nn.Module:
    """A module computing x @ weight^T + bias; weight: [N, K] already in the compute dtype."""
    n, k = weight.shape
    if quant == "none":
        lin = nn.Linear(k, n, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.to(device), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(device), requires_grad=False)
        return lin
    import bitsandbytes as bnb

    if quant == "int8":
        lin = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        lin.weight = bnb.nn.Int8Params(weight.contiguous().cpu(), requires_grad=False, has_fp16_weights=False)
    elif quant == "nf4":
        lin = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=weight.dtype, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(weight.contiguous().cpu(), requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"unknown base quantization {quant!r}; choose from {', '.join(BASE_QUANTS)}")
    if bias is not None:
        lin.bias = nn.Parameter(bias.cpu(), requires_grad=False)
    return lin.to(device)
