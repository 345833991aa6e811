"""Human and JSON rendering of client results for the CLI."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from .types import DeltaInfo, ServerInfo


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def to_json(value: Any) -> str:
    """One-line JSON of a result dataclass (or list of them); datetimes as ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return json.dumps(value, default=_default, ensure_ascii=False)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def delta_line(d: DeltaInfo) -> str:
    """One-line summary of a delta, for load results."""
    pinned = ", pinned" if d.pinned else ""
    return (
        f"{d.tenant} v{d.version}: {d.tier}, {human_bytes(d.bytes)}{pinned}, loaded in {d.load_seconds:.3f} s"
    )


def delta_table(deltas: list[DeltaInfo]) -> str:
    """Fixed-width table of ListDeltas results (one row per tenant)."""
    header = ("TENANT", "TIER", "SIZE", "PINNED", "IN-FLIGHT", "HITS", "LAST USED", "LOAD S", "VER", "PATH")
    rows = [header]
    for d in deltas:
        last = d.last_used.strftime("%Y-%m-%d %H:%M:%S") if d.last_used else "-"
        rows.append(
            (
                d.tenant,
                str(d.tier),
                human_bytes(d.bytes),
                "yes" if d.pinned else "no",
                str(d.in_flight),
                str(d.hits),
                last,
                f"{d.load_seconds:.3f}",
                str(d.version),
                d.path,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [f"{d.tenant}: NOT SERVED: {d.error}" for d in deltas if d.error]
    return "\n".join(lines)


def server_info_text(info: ServerInfo) -> str:
    lim = info.limits
    lines = [
        f"base model:        {info.base_model}",
        f"architecture:      {info.architecture}",
        f"base fingerprint:  {info.base_fingerprint}",
        f"codecs:            {', '.join(info.codecs) or '-'}",
        f"device / dtype:    {info.device} / {info.dtype}",
        f"version:           {info.version}",
        f"limits:            prompt {lim.max_prompt_tokens} tokens, new {lim.max_new_tokens} tokens, "
        f"context {lim.max_context_tokens} tokens, queue {lim.max_queued_requests}, "
        f"batch {lim.max_batch_requests}, message {human_bytes(lim.max_message_bytes)}",
    ]
    return "\n".join(lines)
