"""Base linear layers: plain torch, oneDNN-prepacked (CPU), or bitsandbytes 8-bit / 4-bit (NF4).

Every base module computes x @ weight^T + bias over x: [T, K]; which one a model gets is
decided once at load by `make_base_linear` from the quantization and the linear backend.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.layers.onednn_linear import OneDnnLinear, onednn_available

BASE_QUANTS = ("none", "int8", "nf4")
LINEAR_BACKENDS = ("auto", "torch", "onednn")


def resolve_linear_backend(backend: str, device: torch.device, dtype: torch.dtype, quant: str) -> str:
    """The backend to use, "torch" or "onednn"; auto picks oneDNN for unquantized CPU layers
    whose dtype oneDNN runs natively."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; choose from {', '.join(LINEAR_BACKENDS)}")
    usable = device.type == "cpu" and quant == "none" and onednn_available(dtype)
    if backend == "onednn" and not usable:
        raise ValueError(f"the oneDNN linear backend cannot run {dtype} on {device} (quantization {quant})")
    if backend == "auto":
        return "onednn" if usable else "torch"
    return backend


def make_base_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, quant: str, device: torch.device, backend: str = "torch"
) -> nn.Module:
    """A module computing x @ weight^T + bias; weight: [N, K] already in the compute dtype.

    backend: a resolved backend ("torch" or "onednn", see resolve_linear_backend).
    """
    n, k = weight.shape
    if quant == "none":
        if backend == "onednn":
            return OneDnnLinear(weight.to(device), None if bias is None else bias.to(device))
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


def base_module_bytes(module: nn.Module) -> int:
    """Bytes a base module holds (weights, biases and quantization state)."""
    if isinstance(module, OneDnnLinear):
        return module.nbytes()
    tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def set_base_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Overwrite an unquantized base module's weight [N, K] (and bias) with same-shaped tensors."""
    if isinstance(module, OneDnnLinear):
        module.set_weight(weight.to(module.dtype), bias)
        return
    if not isinstance(module, nn.Linear):
        raise TypeError(f"cannot replace the weight of a {type(module).__name__} base layer")
    if weight.shape != module.weight.shape or (bias is None) != (module.bias is None):
        raise ValueError("replacement weight or bias does not match the base layer")
    module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias)
