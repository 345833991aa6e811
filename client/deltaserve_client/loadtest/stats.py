"""Per-request records and their aggregation into a report (all times in seconds)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    """What happened to one sent request. start/end: seconds since the run started.

    status is "OK" or the gRPC status code name (or CLIENT_TIMEOUT / CANCELLED when the
    load generator gave up on it). ttft is None when no token arrived. itl holds the
    inter-token gaps after the first chunk: a later chunk of k tokens that arrived g
    seconds after the previous one contributes k gaps of g / k.
    """

    index: int
    tenant: str
    start: float
    end: float = 0.0
    status: str = "OK"
    message: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    warmup: bool = False
    turn: int = 0  # 1-based chat turn; 0 = not part of a conversation

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


def summarize(values: list[float]) -> Summary | None:
    """Percentiles by linear interpolation between order statistics (statistics.quantiles,
    inclusive method); None for an empty list."""
    if not values:
        return None
    if len(values) == 1:
        v = values[0]
        return Summary(1, v, v, v, v, v)
    q = statistics.quantiles(values, n=100, method="inclusive")
    return Summary(len(values), statistics.fmean(values), q[49], q[89], q[98], max(values))


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one set of measured requests (the whole run or one tenant)."""

    sent: int
    ok: int
    failed: int
    by_status: dict[str, int]
    req_per_s: float
    tok_per_s: float
    generated_tokens: int
    ttft: Summary | None
    itl: Summary | None
    e2e: Summary | None


def group_stats(records: list[RequestRecord], window: float) -> GroupStats:
    ok = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    by_status = dict(sorted(Counter(r.status for r in records).items()))
    w = max(window, 1e-9)
    return GroupStats(
        sent=len(records),
        ok=len(ok),
        failed=len(records) - len(ok),
        by_status=by_status,
        req_per_s=len(ok) / w,
        tok_per_s=tokens / w,
        generated_tokens=tokens,
        ttft=summarize([r.ttft for r in ok if r.ttft is not None]),
        itl=summarize([g for r in ok for g in r.itl]),
        e2e=summarize([r.e2e for r in ok]),
    )


@dataclass(frozen=True)
class LoadReport:
    """The result of a run. Measured = sent after the warm-up; window = from the end of
    the warm-up to the end of the last measured request."""

    config: dict
    window_s: float
    wall_s: float
    warmup_requests: int
    skipped: int
    total: GroupStats
    per_tenant: dict[str, GroupStats]
    # chat workloads: "first" = turn 1 of each conversation, "later" = turns >= 2
    per_turn: dict[str, GroupStats]
    # one example message per failure status, to say what went wrong
    errors: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def _per_turn(records: list[RequestRecord], window: float) -> dict[str, GroupStats]:
    if not any(r.turn for r in records):
        return {}
    return {
        "first": group_stats([r for r in records if r.turn == 1], window),
        "later": group_stats([r for r in records if r.turn > 1], window),
    }


def build_report(
    records: list[RequestRecord], warmup_s: float, wall_s: float, skipped: int, config: dict
) -> LoadReport:
    measured = [r for r in records if not r.warmup]
    if measured:
        begin = min(warmup_s, min(r.start for r in measured))
        window = max(r.end for r in measured) - begin
    else:
        window = 0.0
    tenants = sorted({r.tenant for r in measured})
    return LoadReport(
        config=config,
        window_s=window,
        wall_s=wall_s,
        warmup_requests=len(records) - len(measured),
        skipped=skipped,
        total=group_stats(measured, window),
        per_tenant={t: group_stats([r for r in measured if r.tenant == t], window) for t in tenants},
        per_turn=_per_turn(measured, window),
        errors={r.status: r.message for r in reversed(records) if not r.ok},
    )
