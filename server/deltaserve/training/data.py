"""Batches for answer-only causal-LM loss."""

from __future__ import annotations

import torch

from deltaserve.tasks.base import Example
from deltaserve.tasks.prompting import answer_ids, prompt_ids

IGNORE = -100


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are IGNORE over the prompt, the answer + EOS ids after it."""
    p = prompt_ids(tokenizer, example)
    a = answer_ids(tokenizer, example)
    return p + a, [IGNORE] * len(p) + a


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask, labels [B, T]."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
