"""Fair-share admission: the Virtual Token Counter (Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024).

Every tenant has a virtual counter of the service it received, in weighted tokens divided by
its weight. Among the tenants with waiting requests, the one with the smallest counter is
admitted first; a tenant that was idle is lifted on arrival, so idleness banks no credit.
Over any window in which tenants stay backlogged, each receives a share of served tokens
proportional to its weight, whatever rate it sends at (a flooding tenant gets its share,
not the batch).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from deltaserve.engine.scheduler import SchedulerPolicy
from deltaserve.engine.sequence import Sequence
from deltaserve.errors import InvalidArgumentError

PROMPT_WEIGHT = 1.0  # w_p: cost of one prompt token computed (the paper's default)
OUTPUT_WEIGHT = 2.0  # w_q: cost of one output token generated (the paper's default)


def delta_key_tenant(seq: Sequence) -> str:
    """A request's tenant: its delta key; base-model requests are the one tenant ""."""
    return seq.request.delta_key or ""


def versionless_tenant(seq: Sequence) -> str:
    """A request's tenant when delta keys are "<tenant>@<version>" (the service's delta cache):
    the key up to "@", so every version of a tenant is one tenant ("" = base model)."""
    return (seq.request.delta_key or "").partition("@")[0]


@dataclass(slots=True)
class _Live:
    """A sequence the policy accounts for (waiting or running)."""

    tenant: str
    prompt_charged: int = 0  # prompt positions already charged (a high-water mark)


class VTCPolicy(SchedulerPolicy):
    """Virtual Token Counter admission over tenants (`tenant_of(seq)`, default the delta key).

    Charges: when a step computes a chunk of a sequence (`on_computed`), its tenant's counter
    grows by (prompt_weight × prompt tokens computed for the first time + output_weight × 1
    when the chunk samples a token) / weight(tenant). Tokens are charged when computed, not
    when admitted, so a chunked prefill is paid chunk by chunk, a step that fails charges
    nothing, and prompt tokens whose KV came from a cache (never computed) are not charged.

    Preemption: a sequence preempted by recompute is charged for its prompt once and for each
    output token once. Recomputing its KV (prompt and earlier outputs) is not charged: the
    scheduler chose to preempt it (the most recently admitted sequence, whatever its tenant),
    so charging the recomputation would penalise a tenant for the engine's memory pressure.

    Admission (`candidates`): among tenants with waiting sequences, the smallest counter goes
    first (ties: the tenant whose head request is earlier in the queue), each tenant's
    sequences in queue order (preempted ones first, as FCFS). Within one step the order is
    simulated: a tenant's counter is raised by the prompt work of the candidates it already
    got (and of its running sequences whose prompt is still uncomputed) before the next pick,
    so one step's free seats are spread over tenants rather than handed to one.

    Lifting (`on_arrival`): a tenant with no waiting or running sequence that gets a request
    has its counter raised to the smallest counter of the active tenants (waiting or running;
    a tenant whose requests all run is being served and charged, so it counts), or, when no
    tenant is active, to the largest counter any tenant had when it last went idle. Counters
    are never lowered.

    weights: tenant -> share weight (> 0; absent tenants weigh 1): a weight-2 tenant gets
    twice the tokens of a weight-1 tenant while both are backlogged. Not thread-safe: the
    engine's thread calls every method.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        prompt_weight: float = PROMPT_WEIGHT,
        output_weight: float = OUTPUT_WEIGHT,
        tenant_of: Callable[[Sequence], str] = delta_key_tenant,
    ) -> None:
        self.weights = dict(weights or {})
        for tenant, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
                raise InvalidArgumentError(f"tenant weight of {tenant!r} must be a number > 0, got {w!r}")
        for name, w in (("prompt_weight", prompt_weight), ("output_weight", output_weight)):
            if not math.isfinite(w) or w < 0:
                raise InvalidArgumentError(f"{name} must be >= 0, got {w!r}")
        if prompt_weight == 0 and output_weight == 0:
            raise InvalidArgumentError("prompt_weight and output_weight cannot both be 0")
        self.prompt_weight = float(prompt_weight)
        self.output_weight = float(output_weight)
        self.tenant_of = tenant_of
        self._counters: dict[str, float] = {}
        self._live: dict[Sequence, _Live] = {}
        self._active: dict[str, int] = {}  # tenant -> live sequences (only tenants with some)
        self._idle_floor = 0.0  # largest counter of a tenant when it went idle

    # ---- reading ----

    def weight(self, tenant: str) -> float:
        return float(self.weights.get(tenant, 1.0))

    def counter(self, tenant: str) -> float:
        """The tenant's virtual counter (weighted tokens / weight); 0 for a tenant never seen."""
        return self._counters.get(tenant, 0.0)

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    # ---- engine hooks ----

    def on_arrival(self, seq: Sequence) -> None:
        if seq in self._live:
            return
        tenant = self.tenant_of(seq)
        if tenant not in self._active:
            floor = min((self._counters[t] for t in self._active), default=self._idle_floor)
            self._counters[tenant] = max(self._counters.get(tenant, 0.0), floor)
        self._live[seq] = _Live(tenant)
        self._active[tenant] = self._active.get(tenant, 0) + 1

    def on_computed(self, seq: Sequence, n: int) -> None:
        live = self._live.get(seq)
        if live is None:
            return
        start, end = seq.num_computed, seq.num_computed + n
        prompt_end = min(end, seq.prompt_len)
        new_prompt = max(0, prompt_end - max(start, live.prompt_charged))
        live.prompt_charged = max(live.prompt_charged, prompt_end)
        cost = self.prompt_weight * new_prompt + (self.output_weight if end == seq.num_tokens else 0.0)
        if cost:
            self._counters[live.tenant] += cost / self.weight(live.tenant)

    def on_finish(self, seq: Sequence) -> None:
        live = self._live.pop(seq, None)
        if live is None:
            return
        left = self._active[live.tenant] - 1
        if left:
            self._active[live.tenant] = left
        else:
            del self._active[live.tenant]
            self._idle_floor = max(self._idle_floor, self._counters[live.tenant])

    # ---- admission ----

    def _pending(self, seq: Sequence) -> int:
        """Prompt tokens of `seq` not yet charged."""
        live = self._live.get(seq)
        return seq.prompt_len - (live.prompt_charged if live is not None else 0)

    def candidates(self, waiting: Seq[Sequence], running: Seq[Sequence]) -> Iterable[Sequence]:
        if not waiting:
            return ()
        queues: dict[str, list[tuple[int, Sequence]]] = {}  # tenant -> (queue position, sequence)
        for i, seq in enumerate(waiting):
            queues.setdefault(self.tenant_of(seq), []).append((i, seq))
        virtual = {t: self.counter(t) for t in queues}
        for seq in running:
            tenant = self.tenant_of(seq)
            if tenant in virtual:  # prompt work admitted but not computed yet counts as served
                virtual[tenant] += self.prompt_weight * self._pending(seq) / self.weight(tenant)
        heap = [(virtual[t], q[0][0], t) for t, q in queues.items()]
        heapq.heapify(heap)
        return self._order(heap, queues)

    def _order(
        self, heap: list[tuple[float, int, str]], queues: dict[str, list[tuple[int, Sequence]]]
    ) -> Iterator[Sequence]:
        """Pop the smallest simulated counter, yield that tenant's next sequence, add the work
        admitting it projects (its uncharged prompt and the token its prefill samples), repeat."""
        taken = dict.fromkeys(queues, 0)
        while heap:
            value, _, tenant = heapq.heappop(heap)
            queue = queues[tenant]
            seq = queue[taken[tenant]][1]
            taken[tenant] += 1
            yield seq
            if taken[tenant] < len(queue):
                cost = self.prompt_weight * self._pending(seq) + self.output_weight
                heapq.heappush(heap, (value + cost / self.weight(tenant), queue[taken[tenant]][0], tenant))
