"""Token embedding and lm_head with per-segment dense tenant deltas."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deltaserve.kernels.segments import Segments


def _segments(segments: Segments):
    return zip(
        segments.starts_list, segments.lengths_list, segments.slots_list, segments.alphas_list, strict=True
    )


class DeltaEmbedding(nn.Module):
    """out[t] = E[id_t] + alpha * dE_tenant[id_t] on each tenant segment."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab, hidden]
        self.deltas: dict[int, torch.Tensor] = {}  # slot -> dE [vocab, hidden]

    def forward(self, ids: torch.Tensor, segments: Segments) -> torch.Tensor:
        out = F.embedding(ids, self.weight)  # [T, hidden]
        if self.deltas:
            for start, length, slot, alpha in _segments(segments):
                d = self.deltas.get(slot)
                if d is not None and length:
                    out[start : start + length] += alpha * F.embedding(ids[start : start + length], d)
        return out


class DeltaLMHead(nn.Module):
    """logits = h @ W^T (+ alpha * h @ dW_t^T per segment). W may be the tied embedding weight."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # [vocab, hidden]; the embedding's Parameter itself when tied
        self.deltas: dict[int, torch.Tensor] = {}  # slot -> dW [vocab, hidden]

    def forward(self, h: torch.Tensor, segments: Segments) -> torch.Tensor:
        """h: [R, hidden] -> fp32 logits [R, vocab]."""
        logits = h @ self.weight.T
        if self.deltas:
            for start, length, slot, alpha in _segments(segments):
                d = self.deltas.get(slot)
                if d is not None and length:
                    logits[start : start + length] += alpha * (h[start : start + length] @ d.T)
        return logits.float()
