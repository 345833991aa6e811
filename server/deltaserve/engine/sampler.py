"""Per-request sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds, logprobs.

Each row is processed on its own logits with its own torch.Generator, so a seeded
request draws the same tokens whatever else shares its batch. Rows whose logits are
not all finite are refused (NonFiniteLogitsError) rather than sampled from garbage;
the engine then fails that request alone.
"""

from __future__ import annotations

import torch

from deltaserve.engine.types import SamplingParams, TokenLogprob
from deltaserve.errors import NonFiniteLogitsError


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """transformers' rule on every seen id (prompt and output): divide positive logits, multiply negative."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    vals = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(vals < 0, vals * penalty, vals / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V]; masks (to -inf) tokens outside the top-k and outside the top-p nucleus."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        remove[0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    return logits


def sample_row(
    logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator | None,
    argmax: int | None = None,
) -> tuple[int, TokenLogprob | None]:
    """logits: fp32 [V] -> (token id, optional logprobs of the raw model distribution).

    argmax: the row's precomputed argmax (a batched argmax), used for plain greedy rows.
    The caller checks that `logits` are finite; the temperature is applied to logits shifted
    by their maximum, so no finite input can overflow.
    """
    if params.temperature == 0.0 and params.repetition_penalty == 1.0 and argmax is not None:
        token = argmax
    elif params.temperature == 0.0:
        processed = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        token = int(torch.argmax(processed))
    else:
        processed = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        shifted = (processed - processed.max()) / params.temperature  # <= 0 everywhere, max exactly 0
        scaled = filter_top_k_top_p(shifted, params.top_k, params.top_p)
        probs = torch.softmax(scaled, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise NonFiniteLogitsError("sampling probabilities became non-finite for this request")
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs == 0:
        return token, None
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, params.logprobs)
    pairs = tuple((int(i), float(v)) for i, v in zip(top.indices, top.values, strict=True))
    return token, TokenLogprob(token, float(logp[token]), pairs)
