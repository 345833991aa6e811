"""Greedy generation and teacher-forced logits through the engine (not through transformers).

`generate_greedy` uses the public request API. The engine has no scoring call, so
`sequence_logits` builds one prefill `ForwardBatch` itself and runs the engine's own
model (same DeltaLinear kernels, same tenant slot and alpha) over whole sequences,
returning logits for every position; it writes into KV-cache rows [0, total tokens),
so it refuses to run while the engine has live requests.
Both take `extra`: more (delta key, alpha) pairs composed with `tenant` (task arithmetic,
as `GenerationRequest.extra_deltas`); the batch is laid out as the runner lays out a
composed request (one segment per delta over the same rows, one 1-bit pass per delta).
"""

from __future__ import annotations

import torch

from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.errors import FailedPreconditionError
from deltaserve.kernels.segments import Segments
from deltaserve.layers.forward_batch import ForwardBatch, PrefillAttention

Deltas = tuple[tuple[str, float], ...]  # (delta key, alpha) pairs


def generate_greedy(
    engine: LLMEngine,
    prompts: list[list[int]],
    tenant: str | None,
    alpha: float,
    max_new_tokens: int,
    extra: Deltas = (),
) -> list[str]:
    """Greedy completions of all prompts, submitted together (continuous batching)."""
    texts: dict[str, str] = {}
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        rid = f"eval-{i}"
        texts[rid] = ""
        engine.add_request(
            GenerationRequest(rid, tuple(p), sampling, delta_key=tenant, alpha=alpha, extra_deltas=extra)
        )
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
    return [texts[f"eval-{i}"] for i in range(len(prompts))]


def sequence_logits(
    engine: LLMEngine,
    seqs: list[list[int]],
    tenant: str | None,
    alpha: float,
    max_tokens: int = 1024,
    extra: Deltas = (),
) -> list[torch.Tensor]:
    """fp32 logits [len(seq), vocab] per sequence: row t predicts token t + 1."""
    if engine.has_unfinished():
        raise FailedPreconditionError("sequence_logits needs an idle engine (it borrows KV rows)")
    # what the engine applies for such a request: nothing for the base, zero alphas left out
    parts = tuple((k, a) for k, a in ((tenant, alpha), *extra) if a != 0.0) if tenant else ()
    capacity = engine.blocks.num_blocks * engine.blocks.block_size
    out: list[torch.Tensor] = []
    chunk: list[list[int]] = []
    for s in seqs:
        if len(s) > min(capacity, max_tokens):
            raise FailedPreconditionError(f"sequence of {len(s)} tokens exceeds the scoring budget")
        if chunk and sum(map(len, chunk)) + len(s) > min(capacity, max_tokens):
            out.extend(_run(engine, chunk, parts))
            chunk = []
        chunk.append(s)
    if chunk:
        out.extend(_run(engine, chunk, parts))
    return out


def _run(engine: LLMEngine, seqs: list[list[int]], parts: Deltas) -> list[torch.Tensor]:
    dev = engine.device
    total = sum(len(s) for s in seqs)
    rows = torch.arange(total, device=dev)  # KV rows, one per token (idle cache)
    prefills, positions, start = [], [], 0
    for s in seqs:
        n = len(s)
        prefills.append(PrefillAttention(start, n, n, rows[start : start + n], None))
        positions.append(torch.arange(n))
        start += n
    entries = [(engine.slots.slot_of(key), alpha) for key, alpha in parts]
    # every delta covers all rows; pass i of the 1-bit kernels serves delta i, once per plane
    seg = Segments.build(
        [0] * len(entries), [total] * len(entries), [e.slot for e, _ in entries], [a for _, a in entries], dev
    )
    passes = [
        tuple(Segments.build([0], [total], [e.slot], [a], dev) for _ in range(e.planes)) for e, a in entries
    ]
    batch = ForwardBatch(
        input_ids=torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=dev),
        positions=torch.cat(positions).to(dev),
        slot_mapping=rows,
        sign_segments=passes[0] if passes else (),
        sign_passes=tuple(passes[1:]),
        delta_segments=seg,
        prefills=tuple(prefills),
        decode=None,
        logits_index=rows,
        logits_segments=seg,
    )
    logits = engine.model(batch, engine.runner.k_caches, engine.runner.v_caches).float().cpu()
    return list(torch.split(logits, [len(s) for s in seqs]))
