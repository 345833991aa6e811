"""Engine statistics snapshot (read by metrics and load tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltaserve.engine.block_manager import PrefixCacheCounters


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    last_step_tokens: int
    last_step_seqs: int
    last_step_tenants: int  # distinct tenant segments (base counts as one) in the last step
    running_deltas: tuple[str, ...]  # delta key per running request ("" = base), sorted
    waiting_deltas: tuple[str, ...]
    num_preemptions: int = 0  # total since start
    num_failed_requests: int = 0  # requests failed alone (non-finite logits, ...) since start
    kv_blocks_cached: int = 0  # free blocks still holding a cached prefix (evictable; not in used)
    prefix_cache: PrefixCacheCounters = field(default_factory=PrefixCacheCounters)  # totals since start


@dataclass(frozen=True)
class StepTimes:
    """Seconds of the parts of the last engine step (host parts and the forward)."""

    schedule: float  # choosing the running set, allocating KV blocks
    build: float  # turning it into a ForwardBatch (tensors, segments, masks)
    forward: float  # the model
    pick: float  # greedy picks + finiteness over the logits (device work) and their copy to the host
    sample: float  # sampling, stop checks, detokenizing, building the outputs
