"""Multiple-choice knapsack by greedy upgrades over each item's lower convex hull.

Each item (a weight matrix) takes exactly one of its options (a number of magnitude bits),
each with an integer cost (bits stored) and a value to minimise (an estimated loss change).
Per item, the options on the lower convex hull of (cost, value) are the only ones a
Lagrangian relaxation ever picks; consecutive hull points form upgrade segments with
increasing (less negative) value change per extra bit. Starting from every item's cheapest
option, `solve` applies the segments in order of best value reduction per extra bit, skipping
a segment (and so the later segments of its item) when it does not fit what is left of the
budget. The result never exceeds the budget. When the applied segments are a prefix of that
order (the budget is a breakpoint of the Lagrangian solutions) it is optimal; otherwise its
total is within the value reduction of one segment of the optimum.
"""

from __future__ import annotations

from collections.abc import Mapping

from deltaserve.errors import InvalidArgumentError


def lower_hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The lower convex hull of (cost, value, option) points, cheapest first, keeping only points
    that lower the value (an option costing more for no lower value is never worth taking)."""
    hull: list[tuple[int, float, int]] = []
    for p in sorted(points, key=lambda q: (q[0], q[1])):
        if hull and (p[0] == hull[-1][0] or p[1] >= hull[-1][1]):
            continue
        while len(hull) >= 2:
            (c0, v0, _), (c1, v1, _) = hull[-2], hull[-1]
            # hull[-1] on or above the segment hull[-2] -> p: not on the lower hull
            if (v1 - v0) * (p[0] - c0) >= (p[1] - v0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def solve(
    costs: Mapping[str, Mapping[int, int]], values: Mapping[str, Mapping[int, float]], budget: float
) -> dict[str, int]:
    """item -> option minimising the sum of values with the sum of costs <= budget (see the module
    doc for how close to the optimum). costs[item] and values[item] share their options.
    InvalidArgumentError when even the cheapest option of every item exceeds the budget."""
    hulls: dict[str, list[tuple[int, float, int]]] = {}
    for item, options in costs.items():
        if set(options) != set(values[item]) or not options:
            raise InvalidArgumentError(f"{item}: costs and values must name the same non-empty options")
        hulls[item] = lower_hull([(int(options[o]), float(values[item][o]), o) for o in options])
    spent = sum(h[0][0] for h in hulls.values())
    if spent > budget:
        raise InvalidArgumentError(f"the cheapest options cost {spent} bits, over the budget of {budget:.0f}")
    segments = [
        ((h[i + 1][1] - h[i][1]) / (h[i + 1][0] - h[i][0]), item, i)
        for item, h in hulls.items()
        for i in range(len(h) - 1)
    ]
    at = dict.fromkeys(hulls, 0)
    for _slope, item, i in sorted(segments):
        h = hulls[item]
        extra = h[i + 1][0] - h[i][0]
        if at[item] == i and spent + extra <= budget:
            at[item] = i + 1
            spent += extra
    return {item: hulls[item][at[item]][2] for item in hulls}
