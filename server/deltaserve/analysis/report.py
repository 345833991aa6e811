"""Output of `deltaserve analyze`: a text summary, markdown, JSON, a PNG plot, rank correlation."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deltaserve.analysis.run import AnalyzeResult, EditResult

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """Group label of a parameter: "L12" for anything in decoder block 12, else the name
    without ".weight" and the "model." prefix (embed_tokens, norm, lm_head)."""
    m = _LAYER.search(name)
    if m:
        return f"L{m[1]}"
    return name.removeprefix("model.").removesuffix(".weight")


def layer_shares(row: EditResult) -> dict[str, float]:
    """Per decoder block (and per non-block tensor): the sum of its matrices' shares."""
    out: dict[str, float] = {}
    for name, s in row.shares.items():
        key = layer_of(name)
        out[key] = out.get(key, 0.0) + s
    return out


def top_layers(row: EditResult, n: int = 3) -> list[tuple[str, float]]:
    """The n layers with the largest |share|, largest first."""
    return sorted(layer_shares(row).items(), key=lambda kv: -abs(kv[1]))[:n]


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with < 3 points or a constant side."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def correlation(result: AnalyzeResult) -> float | None:
    return spearman([r.estimate for r in result.rows], [r.measured for r in result.rows])


def _tops(row: EditResult) -> str:
    return ", ".join(f"{k} {v:+.0%}" for k, v in top_layers(row))


def summary(result: AnalyzeResult) -> str:
    """Aligned text table for a terminal, with the setting and the threshold above it."""
    m = result.meta
    head = (
        f"fine-tune {m['finetuned']} on {m['calib']}: {m['examples']} examples, {m['target_tokens']} "
        f"completion tokens, L(post) = {m['loss_post']:.4f}, C = {m['steps']}, "
        f"competitive when |dL| <= tau = {m['tau']:.3g} ({m['tau_rule']})"
    )
    cols = ["edit", "estimate", "measured", "category", "(measured)", "|dW~|/|dW|", "top layers (share)"]
    rows = [
        [
            r.label,
            f"{r.estimate:+.4g}",
            f"{r.measured:+.4g}",
            r.category,
            r.measured_category,
            "-" if r.relative_norm is None else f"{r.relative_norm:.3f}",
            _tops(r),
        ]
        for r in result.rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [head, "", "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    rho = correlation(result)
    lines += ["", f"Spearman rank correlation, estimate vs measured: {'-' if rho is None else f'{rho:.3f}'}"]
    return "\n".join(lines)


def to_markdown(result: AnalyzeResult, title: str | None = None) -> str:
    m = result.meta
    lines = [f"### {title}", ""] if title else []
    lines += [
        f"Fine-tune `{m['finetuned']}`, calibration {m['calib']} ({m['examples']} examples, "
        f"{m['target_tokens']} completion tokens), L(post) = {m['loss_post']:.4f} nats/token, "
        f"C = {m['steps']}, τ = {m['tau']:.3g} ({m['tau_rule']}).",
        "",
        "| edit | estimate ΔL | measured ΔL | category | measured category | ‖ΔW̃‖/‖ΔW‖ "
        "| top layers (share) |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    for r in result.rows:
        rel = "-" if r.relative_norm is None else f"{r.relative_norm:.3f}"
        lines.append(
            f"| {r.label} | {r.estimate:+.4g} | {r.measured:+.4g} | {r.category} | {r.measured_category} "
            f"| {rel} | {_tops(r)} |"
        )
    rho = correlation(result)
    lines += ["", f"Spearman rank correlation (estimate vs measured): {'-' if rho is None else f'{rho:.3f}'}"]
    return "\n".join(lines) + "\n"


def to_json(result: AnalyzeResult) -> str:
    data = asdict(result)
    data["spearman"] = correlation(result)
    for row, r in zip(data["rows"], result.rows, strict=True):
        row["layer_shares"] = layer_shares(r)
    return json.dumps(data, indent=2)


def plot(result: AnalyzeResult, out: Path) -> Path:
    """One PNG: estimate vs measured per edit (symlog axes, the competitive band shaded), and
    each edit's share of the estimate per decoder block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tau = result.meta["tau"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    values = [v for r in result.rows for v in (r.estimate, r.measured)]
    lim = max([abs(v) for v in values] + [tau, 1e-9]) * 1.5
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.7, ls=":")
    ax.axhspan(-tau, tau, color="tab:green", alpha=0.12, label=f"competitive |ΔL| ≤ τ = {tau:.2g}")
    ax.axvspan(-tau, tau, color="tab:green", alpha=0.12)
    markers = "os^vD<>pPX*h"
    for i, r in enumerate(result.rows):
        ax.scatter(r.estimate, r.measured, marker=markers[i % len(markers)], s=50, label=r.label)
    linthresh = max(tau, 1e-9)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(f"Riemann estimate of ΔL (C = {result.meta['steps']})")
    ax.set_ylabel("measured ΔL = L(edited) − L(post)")
    rho = correlation(result)
    ax.set_title("Estimate vs measured" + ("" if rho is None else f" (Spearman {rho:.2f})"))
    ax.legend(fontsize=7, loc="upper left")
    for r in result.rows:
        ls = layer_shares(r)
        blocks = sorted((int(k[1:]), v) for k, v in ls.items() if k.startswith("L") and k[1:].isdigit())
        if blocks:
            bx.plot([b[0] for b in blocks], [b[1] for b in blocks], marker=".", label=r.label)
    bx.axhline(0, color="grey", lw=0.6)
    bx.set_xlabel("decoder block")
    bx.set_ylabel("share of the estimate")
    bx.set_title("Where the loss change comes from")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
