"""Decode attention over the paged KV cache: the plain-torch reference and the dispatch.

Semantics, for every sequence b with L = ctx_lens[b] keys (the current token's included),
query head j and its kv head h = j // (Hq // Hkv):

    out[b, j] = softmax(scale * q[b, j] . K[b, p]) @ V[b, p]   over positions p in
                [max(0, L - window), L)  (window 0 = all positions)

where position p of sequence b is row block_tables[b, p // block_size] * block_size +
p % block_size of the cache. The CPU kernel (kernels/cpu/paged_attention.cpp) reads keys and
values straight from the cache; the reference gathers each sequence's rows into a dense
tensor and runs SDPA with a length mask (the portable path, and the CUDA path for now).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from deltaserve.kernels.cpu_ext import load_cpu_extension


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [rows, Hkv, D]
    v_cache: torch.Tensor,  # [rows, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks] (padding: any valid block)
    ctx_lens: torch.Tensor,  # int32 [B]
    max_len: int,  # max(ctx_lens), known on the host
    block_size: int,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """out: [B, Hq, D] in q's dtype (gather + masked SDPA)."""
    b = q.shape[0]
    offs = torch.arange(block_size, device=q.device)
    rows = (block_tables.long()[:, :, None] * block_size + offs).view(b, -1)[:, :max_len]  # [B, L]
    pos = torch.arange(max_len, device=q.device)[None, :]
    lens = ctx_lens.long()[:, None]
    mask = pos < lens
    if window:
        mask &= pos >= lens - window
    k = k_cache[rows].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[rows].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    ctx_lens: torch.Tensor, max_len: int, block_size: int, scale: float, window: int = 0,
) -> torch.Tensor:
    """Same contract as paged_decode_attention_ref; the compiled kernel on the CPU when it builds."""
    if q.device.type == "cpu" and k_cache.is_contiguous() and q.stride(-1) == 1:
        ext = load_cpu_extension()
        if ext is not None:
            return ext.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, block_size, scale,
                                              window)
    return paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, ctx_lens, max_len, block_size, scale, window
    )
