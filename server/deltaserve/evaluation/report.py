"""Evaluation output: markdown table, JSON and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from deltaserve.evaluation.run import EvalResult


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def to_markdown(result: EvalResult) -> str:
    """One table of all rows (per tenant: base, raw, codecs), then the alpha sweep."""
    lines = [
        "| tenant | codec | accuracy | vs fine-tune | logit MSE | perplexity | delta bytes | resident | "
        "ratio | compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ft_acc = {r.tenant: r.accuracy for r in result.rows if r.codec == "raw"}
    for r in result.rows:
        rel = f"{r.accuracy / ft_acc[r.tenant]:.0%}" if ft_acc.get(r.tenant) else "-"
        lines.append(
            f"| {r.tenant} | {r.codec} | {r.accuracy:.1%} | {rel} | {r.logit_mse:.4g} | {r.perplexity:.3f} | "
            f"{_fmt_bytes(r.delta_bytes)} | {_fmt_bytes(r.resident_bytes)} | "
            f"{'-' if r.ratio is None else f'{r.ratio:.1f}x'} | "
            f"{'-' if r.compress_seconds is None else f'{r.compress_seconds:.1f}'} |"
        )
    if result.alpha:
        alphas = sorted({p.alpha for p in result.alpha})
        lines += ["", "Alpha sweep (accuracy / perplexity at per-request alpha):", ""]
        lines.append("| tenant | codec | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
        lines.append("|---|---|" + "---:|" * len(alphas))
        keys = dict.fromkeys((p.tenant, p.codec) for p in result.alpha)
        for t, c in keys:
            pts = {p.alpha: p for p in result.alpha if p.tenant == t and p.codec == c}
            cells = [f"{pts[a].accuracy:.0%} / {pts[a].perplexity:.2f}" if a in pts else "-" for a in alphas]
            lines.append(f"| {t} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(result: EvalResult) -> str:
    return json.dumps(asdict(result), indent=2)


def plot(result: EvalResult, out: Path) -> list[Path]:
    """accuracy_vs_bytes.png (per codec, log bytes) and accuracy_vs_alpha.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    tenants = list(dict.fromkeys(r.tenant for r in result.rows))
    codecs = list(dict.fromkeys(r.codec for r in result.rows if r.delta_bytes))
    markers = "os^vD<>pPX*h"
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for ci, c in enumerate(codecs):
        pts = [(r.delta_bytes, r.accuracy) for r in result.rows if r.codec == c]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[ci % len(markers)], label=c, s=45)
    for t in tenants:
        base = [r.accuracy for r in result.rows if r.tenant == t and r.codec == "base"]
        if base:
            ax.axhline(base[0], color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("delta file bytes (log)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("Accuracy vs delta size (dotted: base model per tenant)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_bytes.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    if result.alpha:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for t, c in dict.fromkeys((p.tenant, p.codec) for p in result.alpha):
            pts = sorted((p.alpha, p.accuracy) for p in result.alpha if p.tenant == t and p.codec == c)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{t} ({c})")
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("alpha (0 = base, 1 = fine-tune, >1 extrapolates)")
        ax.set_ylabel("exact-match accuracy")
        ax.set_title("Accuracy vs per-request delta strength")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_alpha.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths
