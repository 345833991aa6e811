"""Offline prompt files: JSONL lines -> GenerationRequests (used by `deltaserve generate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deltaserve.engine.types import GenerationRequest, SamplingParams
from deltaserve.errors import InvalidArgumentError, NotFoundError

SAMPLING_KEYS = (
    "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ignore_eos", "logprobs",
)
KNOWN_KEYS = {
    "prompt", "messages", "prompt_token_ids", "tenant", "alpha", "stop", "stop_token_ids", *SAMPLING_KEYS,
}


@dataclass(frozen=True)
class PromptLine:
    index: int
    request: GenerationRequest


def encode_prompt(tokenizer, line: dict, where: str) -> tuple[int, ...]:
    """Token ids of a line's `prompt` (text), `messages` (chat template) or `prompt_token_ids`."""
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if k in line]
    if len(given) != 1:
        raise InvalidArgumentError(f"{where}: give exactly one of prompt, messages, prompt_token_ids")
    if "prompt" in line:
        if not isinstance(line["prompt"], str):
            raise InvalidArgumentError(f"{where}: prompt must be a string")
        return tuple(tokenizer(line["prompt"])["input_ids"])
    if "messages" in line:
        if tokenizer.chat_template is None:
            raise InvalidArgumentError(f"{where}: the model has no chat template; use prompt")
        text = tokenizer.apply_chat_template(line["messages"], tokenize=False, add_generation_prompt=True)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = line["prompt_token_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise InvalidArgumentError(f"{where}: prompt_token_ids must be a list of integers")
    return tuple(ids)


def read_prompts(path: Path, tokenizer, defaults: SamplingParams) -> list[PromptLine]:
    """Parse and validate every line (InvalidArgumentError names the line) before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"prompts file {path} does not exist")
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(line, dict):
            raise InvalidArgumentError(f"{where}: each line must be a JSON object")
        unknown = sorted(set(line) - KNOWN_KEYS)
        if unknown:
            raise InvalidArgumentError(f"{where}: unknown keys {', '.join(unknown)}")
        fields = {k: line[k] for k in SAMPLING_KEYS if k in line}
        try:
            sampling = SamplingParams(**{
                **{k: getattr(defaults, k) for k in SAMPLING_KEYS},
                **fields,
                "stop": tuple(line.get("stop", ())),
                "stop_token_ids": tuple(line.get("stop_token_ids", ())),
            })
            req = GenerationRequest(
                request_id=str(len(out)),
                prompt_token_ids=encode_prompt(tokenizer, line, where),
                sampling=sampling,
                delta_key=line.get("tenant") or None,
                alpha=float(line.get("alpha", 1.0)),
            )
        except (TypeError, ValueError) as exc:  # InvalidArgumentError is a ValueError
            raise InvalidArgumentError(f"{where}: {exc}") from exc
        out.append(PromptLine(len(out), req))
    if not out:
        raise InvalidArgumentError(f"{path} holds no prompts")
    return out
