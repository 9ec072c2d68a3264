"""Multiple-choice knapsack: pick one option per item, minimising the summed value (a
sensitivity) under a budget on the summed integer cost (bits).

    minimise  Σ_i v[i][j_i]     subject to   Σ_i c[i][j_i] <= budget,   one j_i per item

Costs are integers (bits), so "the budget is met" is an exact integer comparison — no float
slack. Two solvers:

``dp`` (exact)
    Dynamic programming over the *spare* budget. Every item first takes its cheapest option;
    what is left, ``budget - Σ_i min_j c[i][j]``, is shared out in units of ``g``, the greatest
    common divisor of all cost increments (module sizes share large factors, so ``g`` is big and
    the table small). ``best[c]`` = least value with at most ``c`` spare units; one pass per item,
    ``best'[c] = min_j best[c - d_ij] + v_ij``, with the arg-min kept per item for the backtrack.
    Time and memory are ``items × (spare units + 1)`` cells; used when that is at most
    ``max_dp_cells``.

``lagrangian`` (approximate, any size)
    For a multiplier λ every item independently minimises ``v + λ·c``; as λ falls the choices
    walk up each item's lower convex hull of (cost, value) points. Walking all hull segments in
    order of value saved per bit, and taking each while it fits, gives the Lagrangian solution
    for the largest λ that fits the budget. Any budget left over is then filled greedily
    (repeatedly the upgrade, hull or not, with the largest value saved per bit that still fits).
    The LP relaxation (the same walk, taking a fraction of the first segment that does not fit)
    is a lower bound on the optimum, reported as ``lower_bound`` so the gap is visible.

``auto`` uses ``dp`` when it fits in ``max_dp_cells`` and ``lagrangian`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from .errors import LLMProbeError

METHODS = ("auto", "dp", "lagrangian")
DEFAULT_MAX_DP_CELLS = 50_000_000


@dataclass(frozen=True)
class Allocation:
    choice: list[int]            # chosen option index per item
    cost: int                    # Σ chosen costs (<= budget)
    value: float                 # Σ chosen values
    method: str                  # "dp" or "lagrangian"
    lower_bound: float           # proven lower bound on the optimum (== value for dp)


def _check(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int) -> None:
    if len(costs) != len(values):
        raise LLMProbeError("allocation: costs and values must list the same items")
    for i, (c, v) in enumerate(zip(costs, values)):
        if len(c) == 0 or len(c) != len(v):
            raise LLMProbeError(f"allocation: item {i} needs one value per option and at least one option")
        if any(int(x) != x or x < 0 for x in c):
            raise LLMProbeError(f"allocation: item {i} has a cost that is not a non-negative integer")
        if any(not math.isfinite(float(x)) for x in v):
            raise LLMProbeError(f"allocation: item {i} has a non-finite value")
    if int(budget) != budget:
        raise LLMProbeError("allocation: the budget must be an integer")


def minimum_cost(costs: Sequence[Sequence[int]]) -> int:
    return sum(min(int(x) for x in c) for c in costs)


def dp_cells(costs: Sequence[Sequence[int]], budget: int) -> int:
    """Cells the exact solver would fill (items × (spare units + 1))."""
    spare = budget - minimum_cost(costs)
    if spare < 0:
        return 0
    unit = _unit(costs)
    return len(costs) * (spare // unit + 1)


def _unit(costs: Sequence[Sequence[int]]) -> int:
    increments = [int(x) - min(int(y) for y in c) for c in costs for x in c]
    unit = reduce(math.gcd, increments, 0)
    return unit or 1


def allocate(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int, *,
             method: str = "auto", max_dp_cells: int = DEFAULT_MAX_DP_CELLS) -> Allocation:
    """Choose one option per item minimising Σ value with Σ cost <= ``budget`` (module docstring)."""
    if method not in METHODS:
        raise LLMProbeError(f"unknown allocation method {method!r}; use one of {', '.join(METHODS)}")
    _check(costs, values, budget)
    budget = int(budget)
    if not costs:
        return Allocation([], 0, 0.0, "dp", 0.0)
    floor = minimum_cost(costs)
    if budget < floor:
        raise LLMProbeError(f"the budget of {budget} bits is below the smallest possible size, {floor} bits")
    if method == "dp" or (method == "auto" and dp_cells(costs, budget) <= max_dp_cells):
        return _dp(costs, values, budget)
    return _lagrangian(costs, values, budget)


def _dp(costs, values, budget: int) -> Allocation:
    unit = _unit(costs)
    base = [min(int(x) for x in c) for c in costs]
    spare_units = (budget - sum(base)) // unit
    best = np.zeros(spare_units + 1, dtype=np.float64)   # no item yet: value 0 at any spare
    argmins = []
    for c, v, low in zip(costs, values, base):
        increments = [(int(x) - low) // unit for x in c]
        new = np.full_like(best, np.inf)
        pick = np.zeros(best.shape, dtype=np.int32)
        for j, (d, value) in enumerate(zip(increments, v)):
            if d > spare_units:
                continue
            candidate = np.full_like(best, np.inf)
            candidate[d:] = best[:spare_units + 1 - d] + float(value)
            better = candidate < new       # strict: ties keep the earlier (cheaper-listed) option
            new = np.where(better, candidate, new)
            pick = np.where(better, j, pick)
        best = new
        argmins.append(pick)
    choice = [0] * len(costs)
    spare = spare_units
    for i in range(len(costs) - 1, -1, -1):
        j = int(argmins[i][spare])
        choice[i] = j
        spare -= (int(costs[i][j]) - base[i]) // unit
    total_cost = sum(int(costs[i][j]) for i, j in enumerate(choice))
    total_value = float(sum(float(values[i][j]) for i, j in enumerate(choice)))
    return Allocation(choice, total_cost, total_value, "dp", total_value)


def _lower_hull(c: Sequence[int], v: Sequence[float]) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, value), by increasing cost,
    values strictly decreasing (options that cost more without saving anything are dropped)."""
    order = sorted(range(len(c)), key=lambda j: (int(c[j]), float(v[j]), j))
    points: list[int] = []
    for j in order:
        if points and int(c[j]) == int(c[points[-1]]):
            continue                          # same cost, not better (sorted by value)
        if points and float(v[j]) >= float(v[points[-1]]):
            continue                          # dearer and no better
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # b lies on or above the segment a→j: drop it.
            cross = ((int(c[b]) - int(c[a])) * (float(v[j]) - float(v[a]))
                     - (float(v[b]) - float(v[a])) * (int(c[j]) - int(c[a])))
            if cross <= 0:
                points.pop()
            else:
                break
        points.append(j)
    return points


def _lagrangian(costs, values, budget: int) -> Allocation:
    hulls = [_lower_hull(c, v) for c, v in zip(costs, values)]
    choice = [h[0] for h in hulls]
    spent = sum(int(costs[i][h[0]]) for i, h in enumerate(hulls))
    segments = []   # (value saved per bit, item, position on hull)
    for i, h in enumerate(hulls):
        for k in range(1, len(h)):
            dc = int(costs[i][h[k]]) - int(costs[i][h[k - 1]])
            dv = float(values[i][h[k - 1]]) - float(values[i][h[k]])
            segments.append((dv / dc, i, k))
    # Within an item, hull slopes decrease with k, so this order takes each item's segments in order.
    segments.sort(key=lambda s: (-s[0], s[1], s[2]))
    relaxed = float(sum(float(values[i][h[0]]) for i, h in enumerate(hulls)))
    position = [0] * len(costs)
    bound_done = False
    lower_bound = None
    for rate, i, k in segments:
        if position[i] != k - 1:
            continue                          # an earlier segment of this item did not fit
        dc = int(costs[i][hulls[i][k]]) - int(costs[i][hulls[i][k - 1]])
        if spent + dc <= budget:
            spent += dc
            position[i] = k
            choice[i] = hulls[i][k]
            if not bound_done:
                relaxed -= rate * dc
        else:
            if not bound_done:
                lower_bound = relaxed - rate * (budget - spent)
                bound_done = True
            # keep walking: later (flatter) segments of other items may still fit, but the item
            # whose segment failed stays where it is.
            position[i] = -len(costs[i]) - 1
    if lower_bound is None:
        lower_bound = relaxed
    # Greedy fill of what is left: any upgrade that fits, best value saved per bit first.
    while True:
        best = None
        room = budget - spent
        for i, (c, v) in enumerate(zip(costs, values)):
            now = choice[i]
            for j in range(len(c)):
                dc = int(c[j]) - int(c[now])
                dv = float(v[now]) - float(v[j])
                if dv <= 0 or dc > room:
                    continue
                rate = math.inf if dc <= 0 else dv / dc
                if best is None or rate > best[0]:
                    best = (rate, i, j, dc)
        if best is None:
            break
        _, i, j, dc = best
        choice[i] = j
        spent += dc
    total_value = float(sum(float(values[i][j]) for i, j in enumerate(choice)))
    return Allocation(choice, spent, total_value, "lagrangian", min(lower_bound, total_value))
