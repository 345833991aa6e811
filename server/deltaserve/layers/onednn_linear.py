"""Base linear layer through oneDNN with the weight reordered once into its blocked layout.

On the CPU, torch's default `F.linear` (MKL sgemm over a plain [N, K] weight) re-packs the
weight on every call; for decode-sized batches (1–64 rows) that costs as much as the product.
oneDNN's inner-product primitive over a weight reordered once at load runs the same shapes
1.3–2.5× faster on the hosts measured (docs/BENCHMARKS.md, "Base linear"), in fp32 and, on
CPUs with AVX-512-BF16/AMX, in bf16. The result differs from `F.linear` only by fp32 summation
order (the engine's exactness tests hold with either).
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear runs `dtype` natively on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


class OneDnnLinear(nn.Module):
    """y = x @ W^T + b with W held only in oneDNN's blocked layout (no dense copy is kept)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed: torch.Tensor
        self.bias: torch.Tensor | None
        self.set_weight(weight, bias)

    @torch.inference_mode()
    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace the weight ([N, K], same shape and dtype) and bias, reordering once."""
        if tuple(weight.shape) != (self.out_features, self.in_features) or weight.dtype != self.dtype:
            raise ValueError(f"weight must be {self.dtype} [{self.out_features}, {self.in_features}]")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach().to(self.dtype).contiguous()

    def nbytes(self) -> int:
        n = self.out_features * self.in_features * self.packed.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] -> [T, N]."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"
