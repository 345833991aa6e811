"""Model runner: owns the paged KV cache, turns scheduled sequences into a ForwardBatch, runs it.

Token order in a batch: sequences grouped by the (tenant slot, alpha) pairs they apply,
base-model requests first, so every tenant is one contiguous segment for the delta kernels.
A composed request's group carries one segment per delta over the same rows: the dense
paths add them in turn, and the 1-bit kernels (whose segments must not overlap) take part i
of every group in pass i.
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
        sliding_window: int | None, device: torch.device, batch_buckets: tuple[int, ...] = (),
    ) -> None:
        """batch_buckets: sizes decode-only batches are padded to (empty = none)."""
        self.model = model
        self.block_size = block_size
        self.window = sliding_window
        self.device = device
        self.buckets = tuple(sorted(batch_buckets))
        # one extra block, never allocated and always zero, pads ragged block tables: padded
        # (masked) keys and values must be finite, or 0-weight * NaN would leak into other rows
        self.pad_block = num_blocks
        # with buckets, one more: the scratch block padding rows write their keys to and read
        self.scratch_block = num_blocks + 1
        rows = (num_blocks + 1 + bool(self.buckets)) * block_size
        shape = (rows, model.num_kv_heads, model.head_dim)
        n_layers = len(model.layers)
        self.k_caches = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(n_layers)]
        self.v_caches = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(n_layers)]

    @staticmethod
    def kv_bytes_per_block(model_cfg, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * model_cfg.num_hidden_layers * model_cfg.num_key_value_heads * head_dim * block_size * elem

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
    def _order(scheduled: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        groups: dict[tuple[tuple[int, float], ...], list[tuple[Sequence, int]]] = {}
        for seq, n in scheduled:
            groups.setdefault(seq.group, []).append((seq, n))
        # the base group first, the others in order of arrival in `scheduled`
        return sorted(groups.values(), key=lambda g: bool(g[0][0].parts))

    def build(self, scheduled: list[tuple[Sequence, int]]) -> tuple[ForwardBatch, list[Sequence]]:
        """The ForwardBatch of a step and the sequences sampled from it (in logits-row order).

        Host cost is one Python pass over the scheduled sequences (a decode token costs a few
        list appends) and three tensor constructions: every int64 field of the batch is a view
        of one tensor, every int32 field (decode block tables, context lengths, segment
        metadata) of a second, the segment alphas a third; on an accelerator each is one
        host-to-device copy from pinned memory.
        """
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_map: list[int] = []
        prefill_spans: list[tuple[Sequence, int, int, int]] = []  # (seq, start, q_len, ctx)
        dec_tok: list[int] = []
        dec_tables: list[list[int]] = []
        dec_len: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        # (start, len, slot, alpha) segments: all tenants, logits rows, then per kernel pass the
        # 1-bit planes 0, 1, ... (pass i: the i-th delta of every group)
        segs: list[list] = [[], []]
        sign: list[list[list]] = []  # [pass][plane] -> segments
        for members in self._order(scheduled):
            g_start, g_logits = len(ids), len(logits_rows)
            for seq, n in members:
                c = seq.num_computed
                start = len(ids)
                table = seq.block_table
                ctx = c + n
                if n == 1:
                    ids.append(seq.tokens[c])
                    positions.append(c)
                    slot_map.append(table[c // bs] * bs + c % bs)
                    dec_tok.append(start)
                    dec_tables.append(table)
                    dec_len.append(ctx)
                else:
                    ids.extend(seq.tokens[c:ctx])
                    positions.extend(range(c, ctx))
                    slot_map.extend(table[p // bs] * bs + p % bs for p in range(c, ctx))
                    prefill_spans.append((seq, start, n, ctx))
                if ctx == seq.num_tokens:
                    logits_rows.append(start + n - 1)
                    sampled.append(seq)
            for i, (slot, alpha, planes) in enumerate(members[0][0].parts):
                seg = (g_start, len(ids) - g_start, slot, alpha)
                segs[0].append(seg)
                if len(logits_rows) > g_logits:
                    segs[1].append((g_logits, len(logits_rows) - g_logits, slot, alpha))
                sign.extend([] for _ in range(i + 1 - len(sign)))
                sign[i].extend([] for _ in range(planes - len(sign[i])))
                for p in range(planes):
                    sign[i][p].append(seg)
        shape = [len(planes) for planes in sign]  # planes per pass
        segs += [group for planes in sign for group in planes]
        if dec_tok and not prefill_spans and self.buckets:
            self._pad_decode(ids, positions, slot_map, dec_tok, dec_tables, dec_len, logits_rows)
        width = max((len(t) for t in dec_tables), default=0)
        flat_tables: list[int] = []
        for t in dec_tables:
            flat_tables.extend(t)
            flat_tables.extend([self.pad_block] * (width - len(t)))
        seg_fields = [[s[i] for s in group] for group in segs for i in range(3)]
        i64 = self._upload([ids, positions, slot_map, logits_rows, dec_tok], torch.long)
        i32 = self._upload([dec_len, flat_tables, *seg_fields], torch.int32)
        alphas = self._upload([[s[3] for s in group] for group in segs], torch.float32)
        segments = [
            Segments(*i32[2 + 3 * g : 5 + 3 * g], alphas[g], *_columns(group)) for g, group in enumerate(segs)
        ]
        passes, at = [], 2
        for n_planes in shape:
            passes.append(tuple(segments[at : at + n_planes]))
            at += n_planes
        decode = None
        if dec_tok:
            decode = DecodeAttention(
                i64[4], i32[1].view(len(dec_tables), width), i32[0], max(dec_len), bs, self.window or 0
            )
        prefills = tuple(self._prefill(seq, start, n, ctx) for seq, start, n, ctx in prefill_spans)
        batch = ForwardBatch(
            input_ids=i64[0],
            positions=i64[1],
            slot_mapping=i64[2],
            sign_segments=passes[0] if passes else (),
            sign_passes=tuple(passes[1:]),
            delta_segments=segments[0],
            prefills=prefills,
            decode=decode,
            logits_index=i64[3],
            logits_segments=segments[1],
        )
        return batch, sampled

    def _pad_decode(self, ids, positions, slot_map, dec_tok, dec_tables, dec_len, logits_rows) -> None:
        """Append padding rows up to the smallest bucket >= the decode batch: token 0 at position
        0 of a sequence whose only block is the scratch block, outside every tenant segment, its
        logits row computed and never sampled (rows past the real ones are dropped by the caller)."""
        target = next((b for b in self.buckets if b >= len(dec_tok)), len(dec_tok))
        scratch_row = self.scratch_block * self.block_size
        for _ in range(target - len(dec_tok)):
            start = len(ids)
            ids.append(0)
            positions.append(0)
            slot_map.append(scratch_row)
            dec_tok.append(start)
            dec_tables.append([self.scratch_block])
            dec_len.append(1)
            logits_rows.append(start)

    def _upload(self, parts: list[list], dtype: torch.dtype) -> list[torch.Tensor]:
        """One tensor on the compute device holding the concatenated `parts`; a view per part."""
        on_cpu = self.device.type == "cpu"
        flat = torch.tensor([v for part in parts for v in part], dtype=dtype, pin_memory=not on_cpu)
        if not on_cpu:
            flat = flat.to(self.device, non_blocking=True)
        out, at = [], 0
        for part in parts:
            out.append(flat[at : at + len(part)])
            at += len(part)
        return out

    def _prefill(self, seq: Sequence, start: int, n: int, ctx: int) -> PrefillAttention:
        c = ctx - n
        mask = None if c == 0 and self.window is None else self._mask(torch.arange(c, ctx), ctx)
        rows = self._table_rows([seq.block_table], ctx)[0].to(self.device)
        return PrefillAttention(start, n, ctx, rows, None if mask is None else mask.to(self.device))

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


def _columns(group: list[tuple[int, int, int, float]]) -> tuple[tuple, tuple, tuple, tuple]:
    """(starts, lengths, slots, alphas) host tuples of segments given as (start, len, slot, alpha)."""
    return (
        tuple(s[0] for s in group), tuple(s[1] for s in group), tuple(s[2] for s in group),
        tuple(float(s[3]) for s in group),
    )
