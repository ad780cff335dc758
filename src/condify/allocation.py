"""Spreading one compute budget over layers by measured cost (greedy, in the spirit of TEAL).

Each layer has a measured cost curve: points ``(fraction executed, cost)`` with ``(1.0, 0.0)`` (dense
costs nothing). :func:`allocate` picks one fraction per layer so that the weighted mean fraction is the
budget and the summed cost is least, with costs taken as additive across layers and piecewise linear
between points on each curve's lower convex hull. That problem is solved exactly by taking the hull
segments of all layers in order of cost per unit of compute saved (cheapest first) until the budget is
met, the last one in part.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from .config import ConfigError

K = TypeVar("K", bound=Hashable)


def lower_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of ``(fraction, cost)`` points, from the highest fraction down.

    Costs are clamped at 0 first (a measured cost below dense's is noise), so each step down the hull
    costs at least as much per unit of fraction as the one before it."""
    pts = sorted({(float(f), max(0.0, float(c))) for f, c in points}, reverse=True)
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (f1, c1), (f2, c2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to p
            if (c2 - c1) * (f1 - p[0]) >= (p[1] - c1) * (f1 - f2):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    curves: Mapping[K, Sequence[tuple[float, float]]],
    budget: float,
    weights: Mapping[K, float] | None = None,
) -> dict[K, float]:
    """Fraction per key with ``sum(w * f) / sum(w) == budget`` and the least summed cost (module docstring).

    ``curves[k]`` must include ``(1.0, 0.0)``; ``weights`` (default 1) are each layer's dense compute.
    A budget below what the curves reach (every layer at its lowest point) is refused."""
    w = {k: 1.0 if weights is None else float(weights[k]) for k in curves}
    total = sum(w.values())
    hulls = {k: lower_hull(c) for k, c in curves.items()}
    for k, h in hulls.items():
        if h[0] != (1.0, 0.0):
            raise ConfigError(f"allocate: the curve of {k!r} must start at (1.0, 0.0), got {h[0]}")
    floor = sum(w[k] * h[-1][0] for k, h in hulls.items()) / total
    if not floor - 1e-9 <= budget <= 1.0:
        raise ConfigError(f"allocate: budget {budget:.3f} outside [{floor:.3f}, 1] (the curves' range)")
    segments = [
        ((c2 - c1) / ((f1 - f2) * w[k]), k, f1, f2)  # cost per unit of compute saved
        for k, h in hulls.items()
        for (f1, c1), (f2, c2) in zip(h, h[1:], strict=False)
    ]
    segments.sort(key=lambda s: s[0])
    out = dict.fromkeys(curves, 1.0)
    need = (1.0 - budget) * total  # weighted fraction still to remove
    for _, k, f1, f2 in segments:
        if need <= 1e-12:
            break
        step = min(f1 - f2, need / w[k])
        out[k] = f1 - step
        need -= step * w[k]
    return out
