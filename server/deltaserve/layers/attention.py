"""Attention over the paged KV cache.

The cache of one layer is k_cache, v_cache: [num_blocks * block_size, kv_heads, head_dim]
(flat rows; row = block * block_size + offset). New keys/values are scattered into it at
`slot_mapping`; prefills attend per sequence, all single-token (decode) sequences of the
step attend in one call over the paged cache (kernels/attention.py: the CPU kernel reads
keys and values in place, other devices gather and run SDPA).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from deltaserve.kernels.attention import paged_decode_attention
from deltaserve.layers.forward_batch import ForwardBatch


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [rows, Hkv, D]
    v_cache: torch.Tensor,  # [rows, Hkv, D]
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Write k/v into the cache, attend, return [T, Hq, D]."""
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    d = batch.decode
    if d is not None and not batch.prefills:  # a decode-only step: token i is sequence i
        return paged_decode_attention(
            q, k_cache, v_cache, d.block_tables, d.ctx_lens, d.max_len, d.block_size, scale, d.window
        )
    out = torch.empty_like(q)
    for p in batch.prefills:
        rows = slice(p.start, p.start + p.q_len)
        qs = q[rows].transpose(0, 1)  # [Hq, q_len, D]
        if p.q_len == p.ctx_len:  # a whole prompt: its keys are this step's, no gather needed
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [Hkv, ctx, D]
        else:
            ks = k_cache[p.kv_index].transpose(0, 1)
            vs = v_cache[p.kv_index].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True
        )
        out[rows] = o.transpose(0, 1)
    if d is not None:
        o = paged_decode_attention(
            q[d.token_index], k_cache, v_cache, d.block_tables, d.ctx_lens, d.max_len, d.block_size, scale,
            d.window,
        )
        out[d.token_index] = o
    return out
