"""Modules and the patched MLP forward of lte.

Each converted MLP keeps its class, parameter names and weights (neurons permuted in place into
contiguous expert blocks by dynamic-k's balanced k-means, :mod:`condify.methods.dynamic_k.clustering`)
and gains two children:

- ``router``: :class:`SigmoidRouter`, ``s = sigmoid(W_r x + b_r)``, one score per expert;
- ``expert_layout``: dynamic-k's :class:`~condify.methods.dynamic_k.modules.ExpertLayout` buffers:
  ``perm`` (position -> original neuron, for an exact ``unmodify``) and ``tau`` (this layer's threshold,
  ``cfg.threshold`` until ``calibrate`` fits it).

Selection: expert e runs for a token iff ``s_e >= tau``; the selected experts' outputs are summed
unweighted. A token may select none.

Execution modes (:func:`set_mode` / :func:`mode`; runtime only, not saved):

- ``"hard"`` (default): the selection as a (tokens, experts) mask through ``condify.ops.expert_mlp``,
  which reads only the selected experts' contiguous weight blocks;
- ``"masked"``: the same function as ``"hard"`` on the dense hidden layer with the mask applied,
  differentiable in the MLP weights (the routers get no gradient): the stage-2 fine-tune;
- ``"soft"``: every expert runs, expert e weighted by ``s_e / s0`` (``s0 = sigmoid(init_bias)``, the init
  score, so the soft model is exactly dense at init); differentiable in the routers: stage 1;
- ``"original"``: the module's own class forward.

``st.record`` (a list, or None) collects each call's scores (T, E) -- with their graph in soft mode --
for the stage-1 losses and the threshold fit.

Wrapped projections (PEFT LoRA, hooks, quantised linears: any gate/up/down that is not
:func:`~condify.methods.dynamic_k.modules.plain`): every mode calls the projection modules instead of
reading their weights -- ``down(act(gate(x)) * up(x) * mask)`` for hard/masked, the score-weighted
hidden layer for soft: the same functions, differentiable through the wrapped modules, with the same
executed fraction counted. The router is always called as a module (hooks on it fire); a PEFT adapter on
it (``target_modules="all-linear"`` matches it) raises a :class:`~condify.config.ConfigError` at the
first forward: LoRA's delta would be added after the sigmoid and the hard routing gives it no gradient;
routers are trained by ``calibrate``. Everything runs on meta tensors (shape only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import expert_mlp
from ...patching import SiteState, patched
from ..dynamic_k.modules import _blocks, all_plain, check_router, hidden, mlp_modules, module_hidden, no_hooks

METHOD = "lte"
MODES = ("hard", "masked", "soft", "original")


@dataclass
class LteSite(SiteState):
    """State of one converted MLP (its router and layout are children)."""

    kind: ClassVar[str] = "mlp"
    adapter: Any = field(default=None, repr=False)
    expert_size: int = 1
    experts: int = 1
    activation: str = "silu"
    init_score: float = 1.0  # sigmoid(init_bias) in the weights' dtype: the soft mode divides by it
    mode: str = "hard"  # runtime: one of MODES, not saved
    record: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {"experts": self.experts, "expert_size": self.expert_size}


class SigmoidRouter(nn.Linear):
    """``sigmoid(W x + b)``: one score in (0, 1) per expert (an ``nn.Linear`` with a sigmoid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight, self.bias))


_ROUTER_WHY = (
    "LoRA's delta would be added after the router's sigmoid and the hard routing gives it no gradient; "
    "lte routers are trained by condify.calibrate (stage='soft')"
)


def router_scores(mlp: nn.Module, st: LteSite, x: torch.Tensor) -> torch.Tensor:
    """``mlp.router(x)``; a PEFT adapter on the router raises (see the module docstring)."""
    r = mlp.router
    if type(r) is not SigmoidRouter or not no_hooks(r):
        check_router(mlp, METHOD, st.layer, _ROUTER_WHY)
    return r(x)


def lte_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a converted MLP (installed as an instance method)."""
    st: LteSite = self._condify_patch.state
    if st.mode == "original":
        return type(self).forward(self, x, *args, **kwargs)
    s, act = st.expert_size, st.activation
    mods = mlp_modules(st.adapter, self)
    w = st.adapter.mlp_weights(self) if all_plain(mods) else None  # None: call the wrapped modules
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    T, E = xf.shape[0], st.experts
    if st.mode == "soft":
        scores = router_scores(self, st, xf)
        h = hidden(xf, w, act) if w is not None else module_hidden(mods, xf, act)
        g = (scores / st.init_score).to(h.dtype)
        hg = (h.view(T, E, s) * g[:, :, None]).view(T, E * s)
        out = F.linear(hg, w["down"]) if w is not None else mods["down"](hg)
        selected: torch.Tensor | int = T * E  # every expert runs
    else:
        with torch.no_grad():
            scores = router_scores(self, st, xf)
            mask = scores >= self.expert_layout.tau
        if w is None:
            h = module_hidden(mods, xf, act)
            out = mods["down"](h * mask.repeat_interleave(s, dim=1).to(h.dtype))
        elif st.mode == "masked":
            h = hidden(xf, w, act)
            out = F.linear(h * mask.repeat_interleave(s, dim=1).to(h.dtype), w["down"])
        else:
            c = {k: _blocks(k, v) for k, v in w.items()}
            out = expert_mlp(
                xf, c["up"], c["down"], mask, s, act, w_gate=c["gate"], b_up=c["b_up"], b_gate=c["b_gate"]
            )
        selected = mask
    if st.record is not None:
        st.record.append(scores)
    if st.counter is not None:
        st.count(selected.sum() if isinstance(selected, torch.Tensor) else selected, T * E)
    if w is not None and w["b_down"] is not None:  # the down module adds its own bias
        out = out + w["b_down"]
    return out.reshape(*shape[:-1], -1)


Sites = list[tuple[str, nn.Module]]


def converted(model: nn.Module) -> Sites:
    """(path, module) of every MLP converted by lte."""
    return patched(model, METHOD)


def set_mode(model: nn.Module, name: str, sites: Sites | None = None) -> None:
    """Switch every converted MLP (or only ``sites``) to one of :data:`MODES`."""
    if name not in MODES:
        raise ValueError(f"lte: mode must be one of {MODES}, got {name!r}")
    for _, m in converted(model) if sites is None else sites:
        m._condify_patch.state.mode = name


@contextlib.contextmanager
def mode(model: nn.Module, name: str, sites: Sites | None = None) -> Iterator[None]:
    """Temporarily run the converted MLPs in mode ``name`` (``with mode(model, "soft"): ...``)."""
    sites = converted(model) if sites is None else sites
    old = [(m, m._condify_patch.state.mode) for _, m in sites]
    set_mode(model, name, sites)
    try:
        yield
    finally:
        for m, o in old:
            m._condify_patch.state.mode = o


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Collect every converted MLP's scores while open: one list per site, one (T, E) tensor per call."""
    sites = converted(model)
    recs: list[list[torch.Tensor]] = [[] for _ in sites]
    for (_, m), r in zip(sites, recs, strict=True):
        m._condify_patch.state.record = r
    try:
        yield recs
    finally:
        for _, m in sites:
            m._condify_patch.state.record = None


def set_threshold(model: nn.Module, tau: float | dict[str, float]) -> None:
    """Set the selection threshold of every converted MLP (one value, or ``{path: tau}``), in (0, 1)."""
    for p, m in converted(model):
        t = tau[p] if isinstance(tau, dict) else tau
        if not 0.0 < t < 1.0:
            raise ValueError(f"lte: a threshold must be in (0, 1), got {t}")
        m.expert_layout.tau.fill_(float(t))
