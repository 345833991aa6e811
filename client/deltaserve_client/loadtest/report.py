"""Human rendering of a LoadReport (the JSON form is LoadReport.to_dict())."""

from __future__ import annotations

from deltaserve_client.loadtest.stats import GroupStats, LoadReport, Summary


def _ms(s: Summary | None) -> list[str]:
    if s is None:
        return ["-"] * 4
    return [f"{1000 * v:.1f}" for v in (s.p50, s.p90, s.p99, s.max)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)
        return "  ".join(padded)

    line = fmt(header)
    return "\n".join([line, "-" * len(line), *(fmt(r) for r in rows)])


def _status(g: GroupStats) -> str:
    return ", ".join(f"{k} {v}" for k, v in g.by_status.items()) or "-"


def render(report: LoadReport) -> str:
    t = report.total
    c = report.config
    if c.get("concurrency"):
        loop = f"closed loop, concurrency {c['concurrency']}"
    else:
        loop = f"open loop, {c['rate']:g} req/s"
    head = [
        f"target {c.get('target', '?')}  {loop}  stream {'on' if c.get('stream') else 'off'}  "
        f"popularity {c.get('popularity', '?')} over {c.get('n_tenants', '?')} tenant(s)",
        f"measured window {report.window_s:.2f}s (wall {report.wall_s:.2f}s, "
        f"{report.warmup_requests} warm-up request(s) excluded, {report.skipped} arrival(s) skipped)",
        f"requests: sent {t.sent}  ok {t.ok}  failed {t.failed}  by status: {_status(t)}",
        f"throughput: {t.req_per_s:.2f} req/s  {t.tok_per_s:.1f} generated tok/s "
        f"({t.generated_tokens} tokens)",
        "",
    ]
    lat = _table(
        ["latency (ms)", "p50", "p90", "p99", "max"],
        [["TTFT", *_ms(t.ttft)], ["inter-token", *_ms(t.itl)], ["end-to-end", *_ms(t.e2e)]],
    )
    rows = []
    for tenant, g in report.per_tenant.items():
        ttft = g.ttft
        e2e = g.e2e
        rows.append(
            [
                tenant or "(base)",
                str(g.sent),
                str(g.ok),
                str(g.failed),
                f"{g.tok_per_s:.1f}",
                f"{1000 * ttft.p50:.1f}" if ttft else "-",
                f"{1000 * ttft.p99:.1f}" if ttft else "-",
                f"{1000 * e2e.p50:.1f}" if e2e else "-",
                f"{1000 * e2e.p99:.1f}" if e2e else "-",
            ]
        )
    cols = ["tenant", "sent", "ok", "failed", "tok/s", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99"]
    per = _table(cols, rows)
    if report.per_turn:
        turns = _table(
            ["chat turns", "ok", "TTFT p50", "TTFT p90", "TTFT p99", "TTFT max"],
            [[name, str(g.ok), *_ms(g.ttft)] for name, g in report.per_turn.items()],
        )
        per += "\n\nTTFT by chat turn (ms; later = turns >= 2, whose history can be reused):\n" + turns
    errors = "".join(f"  {code}: {msg}\n" for code, msg in sorted(report.errors.items()))
    if errors:
        errors = "\nfailures (one example per status):\n" + errors
    return "\n".join(head) + lat + "\n\nper tenant (ms):\n" + per + "\n" + errors
