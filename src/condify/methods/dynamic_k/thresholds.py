"""Stage 4 of dynamic-k's calibrate: thresholds per site, how the budget is spread over sites, and the
expert order that keeps each token's selected experts in few contiguous runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...allocation import allocate
from ...config import ConfigError, in_range
from ...training import Batch, kl_loss
from .modules import converted, mode, select
from .transform import relayout_

ALLOCATIONS = ("uniform", "global", "sensitivity")
SENSITIVITY_STRIDE = 4  # site_sensitivity: KL at every 4th position


def _fraction(scores: torch.Tensor, tau: float) -> float:
    top = scores.max(-1, keepdim=True).values
    sel = (scores >= top * tau).sum(-1).clamp(min=1)
    return float(sel.float().mean()) / scores.shape[1]


def _bisect(f: Any, target: float, iters: int = 40) -> float:
    """Smallest-error tau in [0, 1] for a non-increasing f(tau) -> executed fraction."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def sensitivity_grid(goal: float) -> tuple[float, ...]:
    """The fractions :func:`site_sensitivity` measures at for a budget ``goal``: halfway to dense, the
    goal, and half of it (plus 1.5 x the goal when below 1), descending."""
    pts = {(1 + goal) / 2, goal, goal / 2} | ({1.5 * goal} if 1.5 * goal < 1 else set())
    return tuple(sorted(pts, reverse=True))


def _sampled_kl(model: nn.Module, b: Batch, ref: torch.Tensor, idx: torch.Tensor) -> float:
    """KL(ref || model) at positions ``idx`` (the LM head runs on those positions only)."""
    logits = model(**b, use_cache=False, logits_to_keep=idx).logits
    view = {"attention_mask": b["attention_mask"][:, idx]} if "attention_mask" in b else {}
    return float(kl_loss(logits, ref, view))


@torch.no_grad()
def site_sensitivity(
    model: nn.Module,
    batches: list[Batch],
    scores: dict[str, torch.Tensor],
    grid: tuple[float, ...],
    oracle: bool = False,
    progress: bool = True,
) -> dict[str, list[tuple[float, float]]]:
    """Per MLP site in ``scores``: ``(fraction, KL)`` points, the mean per-token KL(dense || model) on
    ``batches`` when that site alone runs a ``fraction`` of its experts (tau fitted on its ``scores``;
    router selection in mode ``"masked"``, or ``oracle``) and every other site is dense; ``(1.0, 0.0)``
    first. KL is taken at every ``SENSITIVITY_STRIDE``-th position (the LM head dominates the cost on
    large vocabularies; the layers still see every token)."""
    sites = [(p, m) for p, m in converted(model, "mlp") if p in scores]
    idx = [torch.arange(0, b["input_ids"].shape[1], SENSITIVITY_STRIDE) for b in batches]
    with mode(model, "dense"):
        refs = [
            model(**b, use_cache=False, logits_to_keep=i).logits for b, i in zip(batches, idx, strict=True)
        ]
    out = {}
    for p, m in tqdm(sites, desc="dynamic-k: site sensitivity", disable=not progress, leave=False):
        old = m.expert_layout.tau.clone()
        pts = [(1.0, 0.0)]
        try:
            with mode(model, "dense"), mode(model, "oracle" if oracle else "masked", [(p, m)]):
                for f in grid:
                    m.expert_layout.tau.fill_(_bisect(lambda t, s=scores[p]: _fraction(s, t), f))
                    kl = [_sampled_kl(model, b, r, i) for b, r, i in zip(batches, refs, idx, strict=True)]
                    pts.append((f, sum(kl) / len(kl)))
        finally:
            m.expert_layout.tau.copy_(old)
        out[p] = pts
    return out


@torch.no_grad()
def fit_tau(
    model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    target_sparsity: float,
    *,
    allocation: str = "uniform",
    oracle: bool = False,
    batches: list[Batch] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Set ``expert_layout.tau`` of every site in ``data`` so that ``1 - target_sparsity`` of the expert
    compute runs on ``data``: the same fraction at every site (``"uniform"``), one global tau
    (``"global"``), or per MLP site by measured cost (``"sensitivity"``: :func:`site_sensitivity` on
    ``batches``, then :func:`condify.allocation.allocate`; projections stay uniform). Measured on SmolLM2
    (32-neuron experts, routers only, 4 x 256 held-out tokens): uniform x4.23 @ 55 % executed, global
    x6.13 @ 53 %; a greedy allocation by dropped expert-output energy (tried and removed) x5.57 @ 55 %,
    and x2.36 vs uniform x1.24 at 75 %. With the routed fine-tune after it, sensitivity vs uniform on
    both frontier settings: within 2 % either way at twice the time (``calibration_choices.md``)."""
    in_range("target_sparsity", target_sparsity, 0.0, 1.0, hi_open=True)
    goal = 1.0 - target_sparsity
    sites = [(p, m) for p, m in converted(model) if p in data]
    scores = {}
    for p, m in sites:
        x, norms = data[p]
        scores[p] = norms if oracle else m.router(x)
    fractions = dict.fromkeys(scores, goal)
    if goal >= 1:
        taus = dict.fromkeys(scores, 0.0)
    elif allocation == "global":
        t = _bisect(lambda t: sum(_fraction(s, t) for s in scores.values()) / len(scores), goal)
        taus = dict.fromkeys(scores, t)
    else:
        if allocation == "sensitivity":
            if not batches:
                raise ConfigError("dynamic-k fit_tau: allocation='sensitivity' needs `batches` to measure on")
            curves = site_sensitivity(model, batches, scores, sensitivity_grid(goal), oracle, progress)
            st = {p: m._condify_patch.state for p, m in sites}
            weights = {p: st[p].experts * st[p].expert_size for p in curves}
            fractions.update(allocate(curves, goal, weights))
        taus = {p: _bisect(lambda t, s=s: _fraction(s, t), fractions[p]) for p, s in scores.items()}
    for p, m in sites:
        m.expert_layout.tau.fill_(taus[p])
    return taus


def runs_per_token(mask: torch.Tensor) -> float:
    """Mean number of maximal runs of consecutive selected experts per token (CPU decode: one call chain
    per run, so fewer runs is faster at equal executed compute)."""
    starts = mask[:, :1].sum() + (mask[:, 1:] & ~mask[:, :-1]).sum()
    return float(starts) / max(1, mask.shape[0])


def adjacent_order(mask: torch.Tensor) -> torch.Tensor:
    """An expert order with many co-selected neighbours: a token's runs = its selected experts minus its
    selected adjacent pairs, so a greedy path over the co-selection counts (start: the most selected
    expert, then always the unplaced expert most often selected together with the last one)."""
    m = mask.float()
    co = m.t() @ m
    E = co.shape[0]
    placed = torch.zeros(E, dtype=torch.bool)
    order = [int(co.diagonal().argmax())]
    placed[order[0]] = True
    for _ in range(E - 1):
        nxt = co[order[-1]].masked_fill(placed, -1.0)
        nxt = nxt + 1e-6 * co.diagonal()  # ties: the more frequent expert
        order.append(int(nxt.argmax()))
        placed[order[-1]] = True
    return torch.tensor(order)


@torch.no_grad()
def order_experts_(model: nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Renumber every site's experts (in ``data``) so that co-selected experts are neighbours.

    The function is unchanged (neurons and router outputs move together); the experts a token selects
    then form fewer contiguous runs, which the CPU decode path reads with fewer calls. A site keeps its
    order when :func:`adjacent_order` does not lower its runs on ``data``. Returns the mean runs per
    token before and after, over the sites.
    """
    before, after = [], []
    for p, m in converted(model):
        if p not in data:
            continue
        st = m._condify_patch.state
        x, s = data[p][0], st.expert_size
        mask = select(m.router(x), float(m.expert_layout.tau)).cpu()
        order = adjacent_order(mask)
        runs0, runs1 = runs_per_token(mask), runs_per_token(mask[:, order])
        before.append(runs0)
        after.append(min(runs0, runs1))
        if runs1 >= runs0:
            continue
        relayout_(m, st.adapter, (order[:, None] * s + torch.arange(s)).flatten())
        fc2 = m.router.fc2
        fc2.weight.copy_(fc2.weight[order.to(fc2.weight.device)])
        fc2.bias.copy_(fc2.bias[order.to(fc2.bias.device)])
    k = max(1, len(after))
    return {"runs_per_token_before": sum(before) / k, "runs_per_token_after": sum(after) / k}
