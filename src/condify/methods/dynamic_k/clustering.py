"""Balanced k-means: groups of exactly equal size, so every expert is one contiguous block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy capacity-constrained assignment of n points to k clusters (``cost`` is (n, k)).

    In rounds: every unassigned point proposes to its cheapest cluster that still has room; each
    cluster accepts its cheapest proposers up to its remaining room. Ends with exactly ``capacity``
    points per cluster when ``n == k * capacity``.
    """
    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"cannot split {n} points into {k} clusters of {capacity}")
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    cost = cost.float()
    while True:
        free = (labels < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return labels
        c = cost[free].masked_fill((room == 0)[None, :], float("inf"))
        best_cost, best = c.min(1)
        order = best_cost.argsort(stable=True)
        order = order[best[order].argsort(stable=True)]  # by cluster, then by cost
        cl = best[order]
        first = torch.searchsorted(cl, cl, right=False)  # start of each cluster's run
        rank = torch.arange(cl.numel()) - first
        ok = rank < room[cl]
        labels[free[order[ok]]] = cl[ok]
        room -= torch.bincount(cl[ok], minlength=k)


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Spherical balanced k-means of the rows of ``features`` into ``k`` equal clusters; returns labels.

    Rows are L2-normalised; the cost is ``-cosine`` to the (normalised) centroid. Initial centroids
    are ``k`` distinct rows drawn with a fixed seed; each iteration re-assigns under the equal-size
    constraint (:func:`balanced_assign`) and recomputes centroids.
    """
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    cap = n // k
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    if cap == 1:
        return torch.arange(n)
    x = F.normalize(features.detach().float().cpu(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:k]]
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(-(x @ centroids.t()), cap)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros(k, x.shape[1]).index_add_(0, labels, x)
        centroids = F.normalize(sums, dim=1)
    return labels


def permutation(labels: torch.Tensor) -> torch.Tensor:
    """Neuron order that makes each cluster a contiguous block (cluster 0 first), stable within one."""
    return labels.argsort(stable=True)
