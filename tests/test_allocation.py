"""condify.allocation: the greedy budget split against a brute-force search."""

from __future__ import annotations

import itertools
import random

import pytest

from condify.allocation import allocate, lower_hull
from condify.config import ConfigError


def _cost(hull: list[tuple[float, float]], f: float) -> float:
    """Piecewise-linear cost on a hull (fractions descending) at fraction ``f``."""
    f = min(max(f, hull[-1][0]), hull[0][0])  # rounding at the ends
    for (f1, c1), (f2, c2) in zip(hull, hull[1:], strict=False):
        if f2 <= f <= f1:
            return c1 + (c2 - c1) * (f1 - f) / (f1 - f2)
    raise ValueError(f)


def test_lower_hull_drops_points_above_the_chord_and_clamps_noise() -> None:
    pts = [(1.0, 0.0), (0.75, 0.5), (0.5, 0.6), (0.25, 3.0), (0.875, -0.01)]
    # (0.75, 0.5) lies above the chord from (1, 0) to (0.5, 0.6); -0.01 is clamped to 0
    assert lower_hull(pts) == [(1.0, 0.0), (0.875, 0.0), (0.5, 0.6), (0.25, 3.0)]


def test_allocate_spends_the_budget_where_it_is_cheap() -> None:
    curves = {
        "robust": [(1.0, 0.0), (0.5, 0.1), (0.25, 0.3)],
        "fragile": [(1.0, 0.0), (0.5, 2.0), (0.25, 5.0)],
    }
    out = allocate(curves, 0.625)
    assert out == pytest.approx({"robust": 0.25, "fragile": 1.0})
    same = {k: [(1.0, 0.0), (0.5, 1.0), (0.25, 3.0)] for k in "abc"}
    assert allocate(same, 0.5) == pytest.approx(dict.fromkeys("abc", 0.5))


def test_allocate_matches_brute_force_with_weights() -> None:
    rng = random.Random(0)
    grid = [1.0, 0.8, 0.6, 0.4, 0.2]
    for trial in range(20):
        curves, weights = {}, {}
        for k in range(3):
            costs = sorted(rng.uniform(0, 2) for _ in grid[1:])
            curves[k] = [(1.0, 0.0)] + list(zip(grid[1:], costs, strict=True))
            weights[k] = rng.choice([1.0, 2.0, 3.0])
        budget = rng.uniform(0.3, 0.9)
        out = allocate(curves, budget, weights)
        total = sum(weights.values())
        assert sum(weights[k] * f for k, f in out.items()) / total == pytest.approx(budget)
        hulls = {k: lower_hull(c) for k, c in curves.items()}
        got = sum(_cost(hulls[k], f) for k, f in out.items())
        # brute force: a fine grid over two fractions, the third from the budget
        best = float("inf")
        steps = [0.2 + i * 0.01 for i in range(81)]
        for f0, f1 in itertools.product(steps, steps):
            f2 = (budget * total - weights[0] * f0 - weights[1] * f1) / weights[2]
            if 0.2 <= f2 <= 1.0:
                best = min(best, _cost(hulls[0], f0) + _cost(hulls[1], f1) + _cost(hulls[2], f2))
        assert got <= best + 1e-9, trial


def test_allocate_refuses_budgets_outside_the_curves() -> None:
    curves = {"a": [(1.0, 0.0), (0.5, 1.0)]}
    with pytest.raises(ConfigError, match="outside"):
        allocate(curves, 0.25)
    with pytest.raises(ConfigError, match="must start at"):
        allocate({"a": [(0.5, 1.0)]}, 0.75)
