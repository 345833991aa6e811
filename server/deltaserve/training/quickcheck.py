"""Greedy answers with a transformers model: the fine-tuner's own sanity check.

The fidelity numbers come from `deltaserve eval`, which runs through the engine;
this is only the quick held-out accuracy `deltaserve finetune` prints.
"""

from __future__ import annotations

import torch

from deltaserve.tasks.base import Example
from deltaserve.tasks.prompting import is_correct, prompt_ids


@torch.no_grad()
def greedy_answers(
    model, tokenizer, examples: list[Example], max_new_tokens: int, batch: int = 16
) -> list[str]:
    """Greedy completions (decoded, special tokens skipped), left-padded batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for i in range(0, len(examples), batch):
        prompts = [prompt_ids(tokenizer, e) for e in examples[i : i + batch]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.extend(tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen)
    return out


def accuracy(model, tokenizer, examples: list[Example], max_new_tokens: int) -> float:
    """Exact-match accuracy (see `prompting.normalize_answer`) of greedy answers."""
    if not examples:
        return 0.0
    answers = greedy_answers(model, tokenizer, examples, max_new_tokens)
    return sum(is_correct(a, e.answer) for a, e in zip(answers, examples, strict=True)) / len(examples)
