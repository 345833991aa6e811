"""RMSNorm with per-segment tenant deltas on its weight."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.kernels import fused
from deltaserve.kernels.segments import Segments
from deltaserve.layers.slots import DenseSlots


class DeltaRMSNorm(nn.Module, DenseSlots):
    """y = (w + alpha * dw_t) * x / rms(x) on each tenant segment; dw_t never merged into w."""

    def __init__(self, weight: torch.Tensor, eps: float, name: str) -> None:
        nn.Module.__init__(self)
        DenseSlots.__init__(self, tuple(weight.shape))  # slots: dw [hidden]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.name = name  # HF parameter name of the weight

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """x: [T, hidden]; segments index rows of x."""
        if not self.deltas:
            return fused.rms_norm(x, self.weight, self.eps)
        normed = fused.rms_normalize(x, self.eps)  # tenant rows add alpha * dw * normed
        out = self.weight * normed
        for start, length, slot, alpha in zip(
            segments.starts_list, segments.lengths_list, segments.slots_list, segments.alphas_list,
            strict=True,
        ):
            dw = self.deltas.get(slot)
            if dw is not None and length:
                out[start : start + length] += (alpha * dw) * normed[start : start + length]
        return out
