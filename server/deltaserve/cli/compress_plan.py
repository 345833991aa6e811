"""`deltaserve compress --codec bitdelta-auto`: the planner's flags and its summary lines."""

from __future__ import annotations

import argparse

PLAN_FLAGS = {
    "plan_choices": "--plan-choices",
    "plan_steps": "--plan-steps",
    "plan_samples": "--plan-samples",
    "plan_seq_len": "--plan-seq-len",
    "plan_batch": "--plan-batch",
}
DISTILL_FLAGS = ("distill_steps", "distill_budget")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The bitdelta-auto planning group; `plan_config` reads it (with --calib and the codec's budget)."""
    plan = parser.add_argument_group(
        "bit allocation (bitdelta-auto): magnitude bits per matrix planned on --calib under "
        "--budget-bits-per-weight, from Riemann-sum loss estimates"
    )
    plan.add_argument("--plan-choices", help="bits a matrix may get, comma-separated, in [0, 3] (0,1,2,3)")
    plan.add_argument("--plan-steps", type=int, help="Riemann points per choice (3)")
    plan.add_argument("--plan-samples", type=int, help="calibration samples used at most (32)")
    plan.add_argument("--plan-seq-len", type=int, help="tokens per sample of text or token ids (128)")
    plan.add_argument("--plan-batch", type=int, help="samples per pass (4)")


def _choices(text: str | None) -> tuple[int, ...] | None:
    from deltaserve.errors import InvalidArgumentError

    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InvalidArgumentError(f"--plan-choices must be comma-separated integers, got {text!r}") from None


def plan_config(args: argparse.Namespace, codec):
    """The AllocateConfig of a bitdelta-auto codec and the parsed flags, None for other codecs.
    InvalidArgumentError for planning flags without bitdelta-auto, for bitdelta-auto without
    --calib, and for scale distillation flags with it."""
    from deltaserve.deltas.allocate import planner_for
    from deltaserve.errors import InvalidArgumentError

    given = [flag for attr, flag in PLAN_FLAGS.items() if getattr(args, attr) is not None]
    if codec.name != "bitdelta-auto":
        if given:
            raise InvalidArgumentError(f"{', '.join(given)}: only for --codec bitdelta-auto")
        return None
    if any(getattr(args, attr) is not None for attr in DISTILL_FLAGS):
        raise InvalidArgumentError("scale distillation applies to the bitdelta codec, not bitdelta-auto")
    return planner_for(
        codec,
        args.calib,
        choices=_choices(args.plan_choices),
        steps=args.plan_steps,
        samples=args.plan_samples,
        seq_len=args.plan_seq_len,
        batch_size=args.plan_batch,
    )


def short_params(params: dict) -> dict:
    """codec_params with a bitdelta-auto allocation (one entry per matrix) replaced by how many
    matrices got each number of bits, for one-line summaries."""
    if not isinstance(params.get("allocation"), dict):
        return params
    counts: dict[str, int] = {}
    for b in sorted(params["allocation"].values()):
        counts[f"b={b}"] = counts.get(f"b={b}", 0) + 1
    return {**params, "allocation": counts}


def print_plan(plan: dict) -> None:
    """Summary lines of an AllocationPlan dict: bits per weight, matrices per b, estimates."""
    counts = {b: sum(v == b for v in plan["allocation"].values()) for b in plan["choices"]}
    per_b = ", ".join(f"b={b}: {n}" for b, n in counts.items())
    print(
        f"  bit allocation   {plan['bits_per_weight']:.4f} bits/weight "
        f"(budget {plan['budget_bits_per_weight']:g}); matrices per b: {per_b}"
    )
    uniform = ", ".join(
        f"b={b} {plan['uniform_estimates'][str(b)]:+.4g} (measured {plan['uniform_measured'][str(b)]:+.4g})"
        for b in plan["choices"]
    )
    print(f"  predicted dL     {plan['predicted_estimate']:+.4g} nats/token; uniform: {uniform}")
    print(
        f"  planned on       {plan['samples']} samples of {plan['calib']}, loss over {plan['target_tokens']} "
        f"tokens ({plan['loss']}), L(post) {plan['loss_post']:.4f}, {plan['steps']} Riemann points, "
        f"{plan['seconds']:.0f} s"
    )
