"""Tenants and eval sets named on the command line.

`--tenant NAME=DIR[:TASK]`: a fine-tuned checkpoint, optionally with a built-in task
whose held-out split is its eval set. `--eval-set NAME=FILE.jsonl`: an eval set for
tenant NAME (lines `{"prompt" | "messages", "answer"}`, see `tasks.jsonl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deltaserve.errors import InvalidArgumentError
from deltaserve.tasks import get_task
from deltaserve.tasks.base import Example
from deltaserve.tasks.jsonl import read_examples


@dataclass(frozen=True)
class TenantSpec:
    name: str
    finetuned: Path
    task: str | None = None


def parse_tenant(text: str) -> TenantSpec:
    """NAME=DIR[:TASK] -> TenantSpec (the task, when given, must be a built-in task)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise InvalidArgumentError(f"--tenant {text!r}: expected NAME=FINETUNED_DIR[:TASK]")
    path, task = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head and tail and "/" not in tail:
        path, task = head, tail
        get_task(task)
    return TenantSpec(name, Path(path), task)


def parse_eval_sets(items: list[str]) -> dict[str, Path]:
    """[NAME=FILE.jsonl, ...] -> {name: path}."""
    out: dict[str, Path] = {}
    for text in items:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InvalidArgumentError(f"--eval-set {text!r}: expected NAME=FILE.jsonl")
        out[name] = Path(path)
    return out


def eval_examples(tenant: TenantSpec, eval_sets: dict[str, Path], n: int, seed: int = 0) -> list[Example]:
    """The tenant's eval set: its --eval-set file when given, else its task's held-out split."""
    if tenant.name in eval_sets:
        return read_examples(eval_sets[tenant.name])[:n]
    if tenant.task is None:
        raise InvalidArgumentError(
            f"tenant {tenant.name!r} has no eval set: give NAME=DIR:TASK or --eval-set {tenant.name}=FILE"
        )
    return get_task(tenant.task).heldout(n, seed=seed)


def calibration_examples(tenant: TenantSpec, evals: list[Example], n: int) -> list[Example]:
    """Inputs for scale distillation: the task's training split (never held-out prompts) when
    the tenant has a task; otherwise the eval set's prompts (only the fine-tune's logits
    on them are used, never the reference answers)."""
    if tenant.task is not None:
        return get_task(tenant.task).train(n)
    return [Example(e.prompt, "", e.context) for e in evals]
