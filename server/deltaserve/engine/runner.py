"""Model runner: owns the paged KV cache, turns scheduled sequences into a ForwardBatch, runs it.

Token order in a batch: sequences grouped by (tenant slot, alpha), base-model requests
first, so every tenant is one contiguous segment for the delta kernels.
"""

from __future__ import annotations

import torch

from deltaserve.engine.sequence import Sequence
from deltaserve.kernels.segments import Segments
from deltaserve.layers.forward_batch import DecodeAttention, ForwardBatch, PrefillAttention
from deltaserve.models.llama import LlamaFamilyModel


class ModelRunner:
    def __init__(
        self, model: LlamaFamilyModel, num_blocks: int, block_size: int,
        sliding_window: int | None, device: torch.device,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.window = sliding_window
        self.device = device
        # one extra block, never allocated and always zero, pads ragged block tables: padded
        # (masked) keys and values must be finite, or 0-weight * NaN would leak into other rows
        self.pad_block = num_blocks
        rows = (num_blocks + 1) * block_size
        shape = (rows, model.num_kv_heads, model.head_dim)
        n_layers = len(model.layers)
        self.k_caches = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(n_layers)]
        self.v_caches = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(n_layers)]

    @staticmethod
    def kv_bytes_per_block(model_cfg, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_cfg.num_hidden_layers * model_cfg.num_key_value_heads * head_dim * block_size * elem

    def _rows(self, table: list[int], start: int, end: int) -> list[int]:
        """Flat KV rows of positions [start, end) of a sequence."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _table_rows(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """int64 [B, length]: flat KV rows of positions 0..length-1 of each block table
        (tables padded with the zero pad block; padded rows are masked by the caller)."""
        width = max(len(t) for t in tables)
        pad = self.pad_block
        bt = torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.long)
        rows = bt[:, :, None] * self.block_size + torch.arange(self.block_size)
        return rows.view(len(tables), -1)[:, :length]

    def _mask(self, q_pos: torch.Tensor, ctx_len: int) -> torch.Tensor:
        """bool [len(q_pos), ctx_len]: key j visible to query at position p when j <= p (and in window)."""
        k_pos = torch.arange(ctx_len)
        mask = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - self.window
        return mask

    @staticmethod
    def _order(scheduled: list[tuple[Sequence, int]]) -> list[tuple[tuple[int, float], list]]:
        groups: dict[tuple[int, float], list[tuple[Sequence, int]]] = {}
        for seq, n in scheduled:
            key = (-1, 0.0) if seq.slot < 0 else (seq.slot, seq.alpha)
            groups.setdefault(key, []).append((seq, n))
        return sorted(groups.items(), key=lambda kv: kv[0][0] >= 0)  # base group first, stable otherwise

    def build(self, scheduled: list[tuple[Sequence, int]]) -> tuple[ForwardBatch, list[Sequence]]:
        """The ForwardBatch of a step and the sequences sampled from it (in logits-row order)."""
        ids: list[int] = []
        positions: list[int] = []
        slot_map: list[int] = []
        prefills: list[PrefillAttention] = []
        dec_tok: list[int] = []
        dec_tables: list[list[int]] = []
        dec_len: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        sign_seg: list[tuple[int, int, int, float]] = []
        delta_seg: list[tuple[int, int, int, float]] = []
        logit_seg: list[tuple[int, int, int, float]] = []
        for (slot, alpha), members in self._order(scheduled):
            g_start, g_logits = len(ids), len(logits_rows)
            for seq, n in members:
                c = seq.num_computed
                start = len(ids)
                ids.extend(seq.tokens[c : c + n])
                positions.extend(range(c, c + n))
                slot_map.extend(self._rows(seq.block_table, c, c + n))
                ctx = c + n
                if n == 1:
                    dec_tok.append(start)
                    dec_tables.append(seq.block_table)
                    dec_len.append(ctx)
                else:
                    mask = None if c == 0 and self.window is None else self._mask(torch.arange(c, ctx), ctx)
                    rows = self._table_rows([seq.block_table], ctx)[0].to(self.device)
                    mask = None if mask is None else mask.to(self.device)
                    prefills.append(PrefillAttention(start, n, ctx, rows, mask))
                if ctx == seq.num_tokens:
                    logits_rows.append(start + n - 1)
                    sampled.append(seq)
            if slot >= 0:
                seg = (g_start, len(ids) - g_start, slot, alpha)
                delta_seg.append(seg)
                if members[0][0].sign_slot:
                    sign_seg.append(seg)
                if len(logits_rows) > g_logits:
                    logit_seg.append((g_logits, len(logits_rows) - g_logits, slot, alpha))
        decode = None
        if dec_tok:
            width = max(len(t) for t in dec_tables)
            pad = self.pad_block
            tables = [t + [pad] * (width - len(t)) for t in dec_tables]
            decode = DecodeAttention(
                torch.tensor(dec_tok, dtype=torch.long, device=self.device),
                torch.tensor(tables, dtype=torch.int32, device=self.device),
                torch.tensor(dec_len, dtype=torch.int32, device=self.device),
                max(dec_len), self.block_size, self.window or 0,
            )
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slot_map, dtype=torch.long, device=dev),
            sign_segments=_segments(sign_seg, dev),
            delta_segments=_segments(delta_seg, dev),
            prefills=tuple(prefills),
            decode=decode,
            logits_index=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            logits_segments=_segments(logit_seg, dev),
        )
        return batch, sampled

    def scrub(self, table: list[int]) -> None:
        """Zero the KV rows of `table`'s blocks in every layer: a failed request may have left
        non-finite values there, which masked reads by the blocks' next owner must not see."""
        if not table:
            return
        bs = self.block_size
        rows = (torch.tensor(table, dtype=torch.long)[:, None] * bs + torch.arange(bs)).view(-1)
        rows = rows.to(self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_fill_(0, rows, 0)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits [R, vocab] of the batch's sampled rows."""
        return self.model(batch, self.k_caches, self.v_caches)

    def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; returns fp32 logits [R, vocab] and the R sequences they belong to."""
        batch, sampled = self.build(scheduled)
        return self.forward(batch), sampled


def _segments(segs: list[tuple[int, int, int, float]], device: torch.device) -> Segments:
    return Segments.build(
        [s[0] for s in segs], [s[1] for s in segs], [s[2] for s in segs], [s[3] for s in segs], device
    )
