"""Typed demo configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deltaserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class DemoTenant:
    """A tenant of the demo: built by fine-tuning `task` (finetuned None) or from a given fine-tune."""

    name: str
    task: str | None
    finetuned: Path | None = None
    steps: int = 0
    lr: float = 3e-4
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise InvalidArgumentError(f"bad tenant name {self.name!r}")
        if self.finetuned is None and (self.task is None or self.steps < 1):
            raise InvalidArgumentError(f"tenant {self.name!r} needs a fine-tune dir or a task with steps")


# Recipes: 16 steps of 8 examples at lr 3e-4 taught SmolLM2-135M `reverse` to 100% held-out
# exact match (measured); addition is harder and gets 4x the steps. At ~2-2.5 s per step of
# 8 short examples on 2 idle cores that is ~4 minutes of training in all (see docs/DEMO.md).
DEFAULT_TENANTS = (
    DemoTenant("reverse-bot", "reverse", steps=16, batch_size=8),
    DemoTenant("extract-bot", "extract", steps=16, batch_size=8),
    DemoTenant("adder-bot", "add", steps=64, batch_size=8),
)


@dataclass(frozen=True)
class DemoConfig:
    """cache: where the imported base, fine-tunes and deltas live (reused by later runs).

    base: an HF base directory to use instead of importing the embedded SmolLM2 GGUF.
    distill_steps: BitDelta scale distillation steps per tenant (0 disables it).
    """

    cache: Path
    tenants: tuple[DemoTenant, ...] = DEFAULT_TENANTS
    base: Path | None = None
    distill_steps: int = 20
    prompts_per_tenant: int = 3
    max_new_tokens: int = 24
    port: int = 0
    keep_fine_tunes: bool = False

    def __post_init__(self) -> None:
        if not self.tenants:
            raise InvalidArgumentError("the demo needs at least one tenant")
        if len({t.name for t in self.tenants}) != len(self.tenants):
            raise InvalidArgumentError("tenant names must be unique")
        if self.distill_steps < 0 or self.prompts_per_tenant < 1 or self.max_new_tokens < 1:
            raise InvalidArgumentError("distill steps >= 0, prompts per tenant >= 1, max new tokens >= 1")


def default_cache(env: dict[str, str] | None = None) -> Path:
    """$DELTASERVE_CACHE, else ~/.cache/deltaserve (read when the command runs, not at import)."""
    env = os.environ if env is None else env
    if env.get("DELTASERVE_CACHE"):
        return Path(env["DELTASERVE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "deltaserve"
