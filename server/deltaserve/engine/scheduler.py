"""Iteration-level (continuous) batching with a pluggable admission policy.

Every step the running sequences go first (a decode token each, or the next prefill
chunk), within the per-step token budget; when KV blocks run out the most recently
admitted running sequence is preempted by recompute (its blocks freed, back to the front
of the queue). Then the policy proposes waiting sequences to admit, in order; admission
stops at the first that does not fit (seats, tokens or blocks).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from deltaserve.engine.block_manager import BlockManager
from deltaserve.engine.sequence import Sequence


class SchedulerPolicy(Protocol):
    """Chooses which waiting sequences may join the running set this step.

    The on_* hooks let a policy keep its own accounting (engine/fair.py); a policy that
    subclasses this protocol inherits them as no-ops."""

    def candidates(self, waiting: Seq[Sequence], running: Seq[Sequence]) -> Iterable[Sequence]:
        """Waiting sequences to try admitting, in order (a subset of `waiting`)."""
        ...

    def on_arrival(self, seq: Sequence) -> None:
        """A new request joined the queue (not called when a preempted sequence is re-queued)."""

    def on_computed(self, seq: Sequence, n: int) -> None:
        """A step computed tokens[num_computed : num_computed + n] of `seq` (called before
        num_computed moves); the chunk sampled a token when it ends at seq.num_tokens."""

    def on_finish(self, seq: Sequence) -> None:
        """`seq` left the engine: finished, aborted or failed."""


class FCFSPolicy(SchedulerPolicy):
    """First come, first served (preempted sequences are at the front of the queue)."""

    def candidates(self, waiting: Seq[Sequence], running: Seq[Sequence]) -> Iterable[Sequence]:
        return list(waiting)


class FairTenantPolicy(SchedulerPolicy):
    """Per-tenant fairness: tenants (delta keys) with the fewest running sequences go first, each
    tenant's requests FCFS, tenants interleaved round-robin (base-model requests count as one)."""

    def candidates(self, waiting: Seq[Sequence], running: Seq[Sequence]) -> Iterable[Sequence]:
        queues: dict[str, list[Sequence]] = {}
        for seq in waiting:
            queues.setdefault(seq.request.delta_key or "", []).append(seq)
        load = {t: 0 for t in queues}
        for seq in running:
            key = seq.request.delta_key or ""
            if key in load:
                load[key] += 1
        order: list[Sequence] = []
        while queues:
            tenant = min(queues, key=lambda t: (load[t], queues[t][0].arrival_time))
            order.append(queues[tenant].pop(0))
            load[tenant] += 1
            if not queues[tenant]:
                del queues[tenant]
        return order


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_running: int, max_num_batched_tokens: int,
        policy: SchedulerPolicy | None = None,
    ) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy: SchedulerPolicy = policy or FCFSPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.policy.on_arrival(seq)
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq.block_table)  # full blocks stay cached: its recompute may reuse them
        seq.block_keys.clear()
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        block_size = self.blocks.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if len(seq.block_table) * block_size >= seq.num_computed + n:  # room in its blocks
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_computed + n)
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        if out.preempted or not self.waiting or len(self.running) >= self.max_running or budget == 0:
            return out  # nothing to admit: the policy is not asked (VTC sorts the queue)
        for seq in self.policy.candidates(self.waiting, self.running):
            if len(self.running) >= self.max_running or budget == 0:
                break
            hit = self._reuse_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                self.blocks.free(seq.block_table)  # not admitted: give the cached blocks back
                seq.block_keys.clear()
                seq.num_computed = 0
                break
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            self.blocks.record_lookup(seq.num_tokens, hit)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = hit
            self.waiting.remove(seq)
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Start a waiting sequence on the cached blocks of its longest cached prefix (KV of the
        same tokens under the same cache salt); returns the tokens reused."""
        seq.block_table = self.blocks.match(seq.tokens, seq.cache_salt, seq.block_keys)
        seq.num_computed = len(seq.block_table) * self.blocks.block_size
        return seq.num_computed

    def finish(self, seq: Sequence, discard: bool = False) -> list[int]:
        """Drop a finished or aborted sequence from either queue and release its blocks (with
        `discard`, blocks it held alone also leave the prefix cache); returns the blocks freed."""
        self.policy.on_finish(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        release = self.blocks.discard if discard else self.blocks.free
        return release(seq.block_table)
