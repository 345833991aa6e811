"""Reading chat examples from JSONL, with errors that name the file, line and problem.

A line is a JSON object with either `"prompt": str` or `"messages": [{"role", "content"}, ...]`
(ending with the user turn), and `"answer": str`. For training data a `messages` list may
instead end with the assistant turn, which is then the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from deltaserve.errors import InvalidArgumentError, NotFoundError
from deltaserve.tasks.base import Example

ROLES = ("system", "user", "assistant")


def parse_line(obj: object, where: str) -> Example:
    """One decoded JSON line -> Example; InvalidArgumentError names `where` and the problem."""
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if ("prompt" in obj) == ("messages" in obj):
        raise InvalidArgumentError(f'{where}: needs exactly one of "prompt" or "messages"')
    answer = obj.get("answer")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise InvalidArgumentError(f'{where}: "prompt" must be a non-empty string')
        turns: list[tuple[str, str]] = [("user", obj["prompt"])]
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InvalidArgumentError(f'{where}: "messages" must be a non-empty list')
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise InvalidArgumentError(
                    f'{where}: messages[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": str}}'
                )
            turns.append((m["role"], m["content"]))
        if answer is None and turns[-1][0] == "assistant":
            answer = turns.pop()[1]
        if not turns or turns[-1][0] != "user":
            raise InvalidArgumentError(f'{where}: the last message before the answer must have role "user"')
    if not isinstance(answer, str):
        raise InvalidArgumentError(f'{where}: "answer" must be a string')
    return Example(prompt=turns[-1][1], answer=answer, context=tuple(turns[:-1]))


def read_examples(
    path: Path, *, kind: str = "examples file", completion_alias: bool = False
) -> list[Example]:
    """All examples of a JSONL file (blank lines skipped); at least one is required.

    kind names the file in errors; completion_alias accepts "completion" for "answer"
    (prompt/completion files, as calibration sets often are)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{kind} {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
            if completion_alias and isinstance(obj, dict) and "completion" in obj and "answer" not in obj:
                obj = {**obj, "answer": obj.pop("completion")}
            out.append(parse_line(obj, f"{path}:{n}"))
    if not out:
        raise InvalidArgumentError(f"{path}: no examples (empty file)")
    return out
