"""Output of a composition evaluation: a markdown table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from deltaserve.evaluation.compose import ComposeResult


def to_markdown(result: ComposeResult) -> str:
    """One row per served weighting: the weights, then each tenant's eval-set accuracy and
    answer perplexity, and the mean accuracy over the tenants' eval sets."""
    names = [t["name"] for t in result.tenants]
    tasks = {t["name"]: t["task"] or "eval set" for t in result.tenants}
    head = ["row", *(f"w {n}" for n in names)]
    for n in names:
        head += [f"{tasks[n]} acc ({n})", f"{tasks[n]} ppl"]
    head.append("mean acc")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in result.rows:
        cells = [r.label, *(f"{w:g}" for w in r.weights)]
        for n in names:
            s = r.scores.get(n)
            cells += ["-", "-"] if s is None else [f"{s.accuracy:.1%}", f"{s.perplexity:.3f}"]
        accs = [r.scores[n].accuracy for n in names if n in r.scores]
        cells.append(f"{sum(accs) / len(accs):.1%}" if accs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    n = result.meta.get("n", {})
    lines += [
        "",
        "Eval examples per tenant: " + ", ".join(f"{k} {v}" for k, v in n.items())
        + f"; greedy, at most {result.meta.get('max_new_tokens')} new tokens; perplexity over "
        f"the first {result.meta.get('logit_n')} answers (+ EOS).",
    ]
    return "\n".join(lines) + "\n"


def to_json(result: ComposeResult) -> str:
    return json.dumps(asdict(result), indent=2)
