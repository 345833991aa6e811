"""Calibration data for the loss analysis: a tenant's JSONL or a built-in task's examples.

The loss is the fine-tuning loss: mean cross-entropy over the completion tokens (answer +
EOS), the prompt masked, prompts in the tokenizer's chat template (`training.data.encode`).
A JSONL line is `{"prompt" | "messages", "answer" | "completion"}` (`tasks.jsonl`, with
"completion" accepted as another name for "answer").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deltaserve.errors import InvalidArgumentError
from deltaserve.tasks import get_task
from deltaserve.tasks.base import Example
from deltaserve.tasks.jsonl import read_examples
from deltaserve.training.data import IGNORE, collate, encode

SPLITS = ("heldout", "train")


@dataclass(frozen=True)
class CalibSource:
    """Where the examples come from: exactly one of `file` or `task` (split: heldout or train)."""

    file: Path | None = None
    task: str | None = None
    split: str = "heldout"
    examples: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.file is None) == (self.task is None):
            raise InvalidArgumentError("give exactly one of --calib FILE or --task NAME")
        if self.split not in SPLITS:
            raise InvalidArgumentError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.examples < 1:
            raise InvalidArgumentError("--examples must be >= 1")

    def describe(self) -> str:
        return f"file:{self.file}" if self.file is not None else f"task:{self.task}/{self.split}"


def read_calib_file(path: Path) -> list[Example]:
    """Examples of a prompt/completion (or prompt/answer, messages/answer) JSONL; errors name the
    file and line."""
    return read_examples(path, kind="calibration file", completion_alias=True)


def calib_examples(src: CalibSource) -> list[Example]:
    """The first `src.examples` examples of the source."""
    if src.file is not None:
        return read_calib_file(src.file)[: src.examples]
    task = get_task(src.task or "")
    if src.split == "train":
        return task.train(src.examples, seed=src.seed)
    return task.heldout(src.examples, seed=src.seed)


def calib_batches(tokenizer, examples: list[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask, labels) of at most `batch_size` examples,
    sorted by length so little is padded."""
    if batch_size < 1:
        raise InvalidArgumentError("--batch-size must be >= 1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = sorted((encode(tokenizer, e) for e in examples), key=lambda x: len(x[0]))
    batches = [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
    if sum(target_tokens(b) for b in batches) == 0:
        raise InvalidArgumentError("the calibration examples have no completion tokens")
    return batches


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Completion tokens the loss counts in a batch (labels shifted by one, as in a causal LM)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
