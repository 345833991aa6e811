"""Per-step batch metadata passed explicitly through every layer (no globals).

Tokens of all scheduled sequences are flattened into one batch of T tokens,
grouped so that each (tenant slot, alpha) pair is one contiguous segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.kernels.segments import Segments


@dataclass(frozen=True)
class PrefillAttention:
    """One sequence whose q_len > 1 tokens attend per sequence.

    Tokens [start, start + q_len) of the batch are positions [ctx_len - q_len, ctx_len)
    of the sequence; kv_index: int64 [ctx_len], flat KV-cache rows of positions 0..ctx_len-1.
    """

    start: int
    q_len: int
    ctx_len: int
    kv_index: torch.Tensor
    mask: torch.Tensor | None  # bool [q_len, ctx_len] (True = attend), None = plain causal


@dataclass(frozen=True)
class DecodeAttention:
    """All single-token sequences of the step, attended in ONE batched call over the paged cache.

    token_index: int64 [B] rows of the batch; block_tables: int32 [B, max_blocks] (ragged
    tables padded with the never-allocated zero block); ctx_lens: int32 [B] keys per sequence
    (the current token included); max_len: max(ctx_lens) on the host; block_size: KV rows
    per block; window: sliding-window length (0 = none).
    """

    token_index: torch.Tensor
    block_tables: torch.Tensor
    ctx_lens: torch.Tensor
    max_len: int
    block_size: int
    window: int


@dataclass(frozen=True)
class ForwardBatch:
    """Everything a forward pass needs besides the weights and the KV cache.

    input_ids, positions, slot_mapping: int64 [T] (slot_mapping = flat KV-cache row per token).
    sign_segments: per 1-bit plane p, the segments of tenants whose deltas have plane p (one
    kernel call per plane and layer; BitDelta tenants have plane 0 only, multi-bit ones more).
    delta_segments: all tenant segments (dense / low-rank / embedding / norm / bias deltas);
    a composed request's rows carry one segment per delta, so these may overlap (their
    consumers add each segment's delta in turn).
    logits_index: int64 [R] rows whose next token is sampled; logits_segments: the
    tenant segments over those R rows (for the final norm and lm_head deltas).
    sign_passes: further kernel passes of 1-bit planes, for composed requests: pass i holds,
    per plane, the segments of the (i+1)-th delta of each composition (sign_segments is pass
    0); segments within a pass never overlap.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    sign_segments: tuple[Segments, ...]
    delta_segments: Segments
    prefills: tuple[PrefillAttention, ...]
    decode: DecodeAttention | None
    logits_index: torch.Tensor
    logits_segments: Segments
    sign_passes: tuple[tuple[Segments, ...], ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
