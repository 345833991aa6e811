"""Turning examples into token ids, the same way for fine-tuning, evaluation and the demo.

With a chat template (SmolLM2, most instruct models) the prompt is the templated
conversation plus the assistant header; the answer is the answer text followed by
the tokenizer's EOS token (for SmolLM2 `<|im_end|>`, which also ends generation).
Without a chat template the messages' contents are joined with newlines.
"""

from __future__ import annotations

from deltaserve.tasks.base import Example


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """Token ids of the prompt, ending where the model's answer starts."""
    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template(
            example.messages(), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(enc["input_ids"])
    text = "\n".join(m["content"] for m in example.messages())
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def answer_ids(tokenizer, example: Example) -> list[int]:
    """Token ids of the answer followed by EOS (what training teaches the model to emit)."""
    ids = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
    return [*ids, tokenizer.eos_token_id]


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: strip, collapse whitespace runs to one space, drop one trailing '.'.

    Case and inner punctuation are kept: "name=Maria; age=34" must match exactly.
    """
    text = " ".join(text.split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def is_correct(completion: str, answer: str) -> bool:
    """Whether a greedy completion matches the expected answer after `normalize_answer`."""
    return normalize_answer(completion) == normalize_answer(answer)
