"""The request plan: tenant, prompt and max_new_tokens of the i-th request.

A Workload is deterministic for a seed: the same config gives the same requests in
the same order, whatever the timing of the run (the runner only decides *when*
request i is sent).

Multi-turn chat (`chat_turns` > 0): requests come as conversations. Each tenant has its own
system prompt (`system_len` words); turn k of a conversation re-sends the system prompt and
the whole history: user message 1, answer 1, ..., user message k. The answers in the history
are planned stand-ins of max_new_tokens words (not the server's outputs), so the plan stays
independent of timing; turn k's prompt still starts with all of turn k-1's, which is what a
prefix cache can reuse. The runner sends a conversation's turns one after the other.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve_client.loadtest.distributions import IntDist
from deltaserve_client.loadtest.popularity import Popularity

# Common English words: synthetic prompts are sequences of these (about one token each
# with BPE tokenizers of the Llama family).
_WORD_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class LoadRequest:
    """One planned request. tenant "" means the base model."""

    index: int
    tenant: str
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    turn: int = 0  # 1-based turn of a chat conversation; 0 = not part of one


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    tenant: str | None = None
    max_new_tokens: int | None = None


def read_prompts_jsonl(path: Path) -> list[PromptRecord]:
    """Lines: {"prompt": str, "tenant"?: str, "max_new_tokens"?: int}. Blank lines are skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(f"{path}:{lineno}: each line needs a non-empty string field 'prompt'")
            mnt = obj.get("max_new_tokens")
            if mnt is not None and (not isinstance(mnt, int) or mnt < 1):
                raise ValueError(f"{path}:{lineno}: max_new_tokens must be an integer >= 1")
            out.append(PromptRecord(obj["prompt"], obj.get("tenant"), mnt))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def synthetic_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


@dataclass(frozen=True)
class WorkloadConfig:
    """tenants: the tenant ids to spread requests over ("" = base model).

    prompt_len is in words for synthetic prompts; prompts (from a JSONL) replace them,
    and a record's own tenant / max_new_tokens override the sampled ones.
    """

    tenants: tuple[str, ...]
    popularity: Popularity = field(default_factory=lambda: Popularity("uniform"))
    prompt_len: IntDist = field(default_factory=lambda: IntDist("fixed", 32))
    max_new_tokens: IntDist = field(default_factory=lambda: IntDist("fixed", 32))
    prompts: tuple[PromptRecord, ...] = ()
    temperature: float = 0.0
    seed: int = 0
    chat_turns: int = 0
    system_len: int = 500

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("workload needs at least one tenant")
        if self.chat_turns < 0 or self.system_len < 0:
            raise ValueError("chat turns and system prompt length must be >= 0")
        if self.chat_turns and self.prompts:
            raise ValueError("chat conversations use synthetic prompts: give --prompts or --chat-turns")
        if not self.temperature >= 0:
            raise ValueError("temperature must be >= 0")


class Workload:
    """Iterates LoadRequests for a WorkloadConfig (infinite; the runner bounds it)."""

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        self._tenants = config.popularity.sampler(list(config.tenants), seed=config.seed)
        self._rng = random.Random(config.seed + 1)
        self._next = 0

    def next(self) -> LoadRequest:
        c = self.config
        i = self._next
        self._next += 1
        tenant = self._tenants.next()
        mnt = c.max_new_tokens.sample(self._rng)
        if c.prompts:
            rec = c.prompts[i % len(c.prompts)]
            prompt = rec.prompt
            tenant = rec.tenant if rec.tenant is not None else tenant
            mnt = rec.max_new_tokens or mnt
        else:
            prompt = synthetic_prompt(self._rng, c.prompt_len.sample(self._rng))
        seed = None if c.temperature == 0 else c.seed * 1_000_003 + i
        return LoadRequest(i, tenant, prompt, mnt, c.temperature, seed)

    def _system_prompt(self, tenant: str) -> str:
        """The tenant's own system prompt (the same in every conversation of the tenant)."""
        rng = random.Random(f"{self.config.seed}/system/{tenant}")
        return synthetic_prompt(rng, self.config.system_len)

    def next_conversation(self) -> list[LoadRequest]:
        """The next conversation: `chat_turns` requests of one tenant, to be sent in order."""
        c = self.config
        tenant = self._tenants.next()
        history = [self._system_prompt(tenant)]
        out = []
        for turn in range(1, c.chat_turns + 1):
            i = self._next
            self._next += 1
            history.append(synthetic_prompt(self._rng, c.prompt_len.sample(self._rng)))
            mnt = c.max_new_tokens.sample(self._rng)
            seed = None if c.temperature == 0 else c.seed * 1_000_003 + i
            out.append(LoadRequest(i, tenant, "\n".join(history), mnt, c.temperature, seed, turn))
            history.append(synthetic_prompt(self._rng, mnt))  # the planned answer
        return out
