"""Calibration samples for scale distillation: token ids from a file, cut into fixed-length samples.

Accepted files (`--calib`):
- `.txt`: text, tokenised with the base's tokenizer;
- `.json`: a list of token ids or a list of lists of token ids;
- `.jsonl`: one list of ids (or an object with "input_ids") per line, or one chat example per
  line (`{"prompt" | "messages", "answer"}`, the format of `finetune --data` and
  `eval --eval-set`): an example becomes its prompt in the base's chat template followed by its
  answer and EOS, the very tokens the fine-tune was trained on (the tenant's own data).
All ids are concatenated into one stream and cut into samples of `seq_len` tokens (a stream
shorter than seq_len gives one shorter sample). `split_samples` shuffles them with a seed and
holds out a part for early stopping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltaserve.errors import InvalidArgumentError
from deltaserve.tasks.base import Example


def _ids_from_json(value: object, where: Path) -> list[int]:
    if isinstance(value, dict):
        value = value.get("input_ids")
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return [i for seq in value for i in _ids_from_json(seq, where)]
    raise InvalidArgumentError(f"{where}: expected token ids (a list of ints, or of lists of ints)")


def example_ids(tokenizer, examples: list[Example]) -> list[int]:
    """The token stream of chat examples: prompt ids + answer ids + EOS, one after another."""
    from deltaserve.tasks.prompting import answer_ids, prompt_ids

    return [i for e in examples for i in prompt_ids(tokenizer, e) + answer_ids(tokenizer, e)]


def _is_chat_jsonl(lines: list[str]) -> bool:
    first = json.loads(lines[0]) if lines else None
    return isinstance(first, dict) and ("prompt" in first or "messages" in first)


def calibration_ids(calib: Path, base: Path, vocab_size: int) -> list[int]:
    """The calibration token stream of `calib` (see the module doc for accepted files); text and
    chat examples are tokenised with the tokenizer of the checkpoint directory `base`."""
    calib = Path(calib)
    try:
        text = calib.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read calibration file {calib}: {exc}") from exc
    try:
        if calib.suffix == ".json":
            ids = _ids_from_json(json.loads(text), calib)
        elif calib.suffix == ".jsonl":
            lines = [line for line in text.splitlines() if line.strip()]
            if _is_chat_jsonl(lines):
                from transformers import AutoTokenizer

                from deltaserve.tasks.jsonl import read_examples

                ids = example_ids(AutoTokenizer.from_pretrained(base), read_examples(calib))
            else:
                ids = [i for line in lines for i in _ids_from_json(json.loads(line), calib)]
        else:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(base).encode(text, add_special_tokens=False)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{calib} is not valid JSON: {exc}") from exc
    if len(ids) < 2:
        raise InvalidArgumentError(f"calibration file {calib} gives fewer than 2 tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"{calib}: token id {bad[0]} is outside the vocabulary (size {vocab_size})"
        )
    return ids


def cut_samples(ids: list[int], seq_len: int, max_samples: int | None = None) -> torch.Tensor:
    """[n, seq_len] int64 samples of consecutive ids (the first `max_samples` when given); a
    stream shorter than seq_len gives [1, len(ids)]."""
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() < seq_len:
        return t.unsqueeze(0)
    n = t.numel() // seq_len
    if max_samples is not None:
        n = min(n, max_samples)
    return t[: n * seq_len].view(n, seq_len)


def split_samples(
    samples: torch.Tensor, holdout: float, seed: int, max_holdout: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): the samples in a seeded random order, round(holdout * n) of them
    (at least 1 when holdout > 0, at most max_holdout) held out. Nothing is held out when
    holdout is 0 or there is a single sample."""
    n = samples.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = 0 if holdout <= 0 or n < 2 else min(max(1, round(holdout * n)), max_holdout, n - 1)
    return samples[order[: n - held]], samples[order[n - held :]]
