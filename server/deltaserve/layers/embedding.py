"""Token embedding and lm_head with per-segment dense tenant deltas."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deltaserve.kernels.segments import Segments
from deltaserve.layers.onednn_linear import OneDnnLinear
from deltaserve.layers.slots import DenseSlots


def _segments(segments: Segments):
    return zip(
        segments.starts_list, segments.lengths_list, segments.slots_list, segments.alphas_list, strict=True
    )


class DeltaEmbedding(nn.Module, DenseSlots):
    """out[t] = E[id_t] + alpha * dE_tenant[id_t] on each tenant segment (slots: dE [vocab, hidden])."""

    def __init__(self, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        DenseSlots.__init__(self, tuple(weight.shape))
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab, hidden]

    def forward(self, ids: torch.Tensor, segments: Segments) -> torch.Tensor:
        out = F.embedding(ids, self.weight)  # [T, hidden]
        if self.deltas:
            for start, length, slot, alpha in _segments(segments):
                d = self.deltas.get(slot)
                if d is not None and length:
                    out[start : start + length] += alpha * F.embedding(ids[start : start + length], d)
        return out


class DeltaLMHead(nn.Module, DenseSlots):
    """logits = h @ W^T (+ alpha * h @ dW_t^T per segment). W may be the tied embedding weight.

    With the oneDNN backend the product runs over a prepacked copy of W (the dense W stays for
    the embedding lookup when tied); `refresh` re-packs it after W changed in place.
    """

    def __init__(self, weight: nn.Parameter, backend: str = "torch") -> None:
        nn.Module.__init__(self)
        DenseSlots.__init__(self, tuple(weight.shape))  # slots: dW [vocab, hidden]
        self.weight = weight  # [vocab, hidden]; the embedding's Parameter itself when tied
        self.packed = OneDnnLinear(weight.detach(), None) if backend == "onednn" else None

    def refresh(self) -> None:
        """Re-pack after `weight` was overwritten in place."""
        if self.packed is not None:
            self.packed.set_weight(self.weight.detach(), None)

    def forward(self, h: torch.Tensor, segments: Segments) -> torch.Tensor:
        """h: [R, hidden] -> fp32 logits [R, vocab]."""
        logits = self.packed(h) if self.packed is not None else h @ self.weight.T
        if self.deltas:
            for start, length, slot, alpha in _segments(segments):
                d = self.deltas.get(slot)
                if d is not None and length:
                    logits[start : start + length] += alpha * (h[start : start + length] @ d.T)
        return logits.float()
