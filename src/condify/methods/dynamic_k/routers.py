"""Closed-form router warm starts shared by the expert methods (lte's stage 0, mot's transition).

A router that ranks experts the way their outputs rank them is one ridge regression away: record every
converted MLP's inputs and the log norms of its experts' outputs (:func:`expert_norms`) on a few
thousand calibration tokens, standardise the targets (one scale per layer, so experts stay comparable)
and solve for the linear map. No training steps, seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from ...batches import Batch
from .modules import expert_norms, hidden

Sites = list[tuple[str, nn.Module]]
RIDGE = 1e-2  # ridge strength, relative to the mean of the Gram matrix's diagonal


@torch.no_grad()
def record_norms(
    model: nn.Module, sites: Sites, batches: list[Batch]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` on ``batches`` as it is (the caller sets its mode); per site, its inputs (N, d) and the
    log norms of its experts' outputs (N, E) on the real (non-padding) tokens, in float32."""
    xs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in sites}
    ys: dict[str, list[torch.Tensor]] = {p: [] for p, _ in sites}

    def hook(mod: nn.Module, args: tuple, p: str) -> None:
        st = mod._condify_patch.state
        x = args[0].reshape(-1, args[0].shape[-1])
        w = st.adapter.mlp_weights(mod)
        xs[p].append(x.float())
        ys[p].append(
            torch.log(expert_norms(hidden(x, w, st.activation), w["down"], st.expert_size).float() + 1e-6)
        )

    hooks = [m.register_forward_pre_hook(lambda mod, a, p=p: hook(mod, a, p)) for p, m in sites]
    keep: list[torch.Tensor | slice] = []
    try:
        for b in batches:
            model(**b, use_cache=False)
            keep.append(b["attention_mask"].reshape(-1).bool() if "attention_mask" in b else slice(None))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for p, _ in sites:
        out[p] = (torch.cat([v[r] for v, r in zip(xs.pop(p), keep, strict=True)]),
                  torch.cat([v[r] for v, r in zip(ys.pop(p), keep, strict=True)]))  # fmt: skip
    return out


def ridge(
    x: torch.Tensor, y: torch.Tensor, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge regression of ``y`` (N, E), standardised, on ``x`` (N, d), in float64.

    Returns the weight (E, d), the bias (E,) (zeros without ``intercept``) and R^2 on the rows given."""
    x, y = x.double(), y.double()
    y = (y - y.mean()) / y.std().clamp(min=1e-6)
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if intercept else x
    gram = xa.t() @ xa
    coef = torch.linalg.solve(gram + RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=x.dtype),
                              xa.t() @ y)  # fmt: skip
    r2 = float(1 - ((xa @ coef - y) ** 2).mean() / (y**2).mean().clamp(min=1e-12))
    d = x.shape[1]
    bias = coef[d] if intercept else torch.zeros(y.shape[1], dtype=x.dtype)
    return coef[:d].t(), bias, r2
