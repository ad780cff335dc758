"""Modules and the patched MLP forward of mot (Mixture of Tokens, arXiv 2310.15961).

Each converted MLP keeps its class, parameter names and weights (neurons permuted in place into E
contiguous expert blocks of ``s = I / E`` neurons) and gains two children:

- ``router``: the controller ``W_c`` (:class:`Controller`: ``weight`` (E, d), buffer ``temperature``);
- ``expert_layout``: the persistent buffer ``perm`` (position -> original neuron), so ``unmodify``
  restores the original order exactly.

Stage ``"mot"`` (continuous). The batch (B, T, d) is split into B/G groups of G consecutive sequences;
a group is the G tokens at one position. For expert e and a group, ``w_ie = softmax_i(x_i . W_c[e] / t)``,
the mixed input ``m_e = sum_i w_ie x_i`` runs through the expert (the dense MLP restricted to block e),
and token i receives ``y_i = sum_e w_ie expert_e(m_e)``. Mixing is across sequences at one position,
so a later token never changes an earlier output (causal); the last ``B % G`` sequences form a smaller group.
Executed expert compute: E expert evaluations per group of G tokens, i.e. 1/G of the dense MLP.
The MLP does not see the attention mask: padded positions take part in the mixing of their group, so
train the MoT stage on unpadded batches (the corpus windows are) and pad only after the transition.
The t -> 0 limit of the softmax over the group is expert choice (each expert runs its group's
highest-scoring token alone), not token choice; the token-choice model is what the transition builds.

Stage ``"moe"`` (transitioned). Token-choice: token x takes the top-k experts of ``x . W_c`` and sums
their outputs with weight 1 (what an expert's winning token gets in MoT at t -> 0), executed through
``condify.ops.expert_mlp`` (only the selected blocks run), so it works at any batch size, batch 1
included, and with the KV cache. The router learns through a straight-through gate
``1 + p_e - stopgrad(p_e)`` with ``p`` the softmax over the k selected scores (value exactly 1; no
router gradient when k = 1). Weighting the outputs by ``k * softmax`` instead was measured to blow up
the converted SmolLM2 (held-out perplexity 1.4e5 right after the switch: a peaked softmax gives one
expert weight k).

Wrapped projections (PEFT LoRA, hooks, quantised linears: any gate/up/down that is not
:func:`~condify.methods.dynamic_k.modules.plain`): both stages call the projection modules instead of
reading their weights, with the same function and the same executed fraction counted. ``"mot"``: the
dense hidden layer of every expert's mixed input (E/G times the dense up/gate work), block e kept for
expert e, weighted per token and summed by one ``down`` call. ``"moe"``: ``down(h * gates)`` with the
straight-through gates scattered over the selected experts' blocks. The controller is always called as a
module (``router(x)``: hooks on it fire; PEFT itself refuses it as a LoRA target, it is not a Linear).
Everything runs on meta tensors (shape only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import expert_mlp
from ...ops.reference import ACTIVATIONS
from ...patching import SiteState, patched
from ..dynamic_k.modules import all_plain, mlp_modules, module_hidden, scalar

METHOD = "mot"


@dataclass
class MoTSite(SiteState):
    """State of one converted MLP (its controller and layout are children)."""

    kind: ClassVar[str] = "mlp"

    adapter: Any = field(default=None, repr=False)
    group_size: int = 1
    experts: int = 1
    expert_size: int = 1
    top_k: int = 1
    activation: str = "silu"
    stage: str = "mot"  # mirrors the saved config ("mot" | "moe")

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "experts": self.experts, "expert_size": self.expert_size,
                "group_size": self.group_size, "top_k": self.top_k}  # fmt: skip


class Controller(nn.Module):
    """The MoT controller ``W_c`` (E, d) and the mixing temperature; after the transition, the router."""

    def __init__(self, d: int, experts: int, temperature: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, d))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MoTLayout(nn.Module):
    """Persistent neuron order of one converted MLP (``perm[j]`` = original index of neuron j)."""

    def __init__(self, perm: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("perm", perm.to(torch.int64))


def _blocks(t: torch.Tensor | None, E: int, s: int) -> torch.Tensor | None:
    """(I, d) rows or (I,) bias as (E, s, ...) expert blocks (a view for the stored layouts)."""
    return None if t is None else t.reshape(E, s, *t.shape[1:])


def mixing_weights(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Softmax over the group (dim 1 of (N, G, T, E) logits) at ``temperature``, in fp32 at least."""
    z = logits.float() / temperature
    return torch.softmax(z, dim=1).to(logits.dtype)


def mix(
    x: torch.Tensor, router: nn.Module, temperature: float | torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group a (B, T, d) batch, ``B`` a multiple of ``group_size``: mixing weights (N, G, T, E) from
    ``router`` and the mixed inputs (N, T, E, d), one per expert, group and position."""
    B, T, d = x.shape
    xg = x.reshape(B // group_size, group_size, T, d)
    wts = mixing_weights(router(xg), temperature)  # (N, G, T, E)
    return wts, torch.einsum("ngte,ngtd->nted", wts, xg)


def by_groups(
    fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``fn(part, g)`` over the full groups of a (B, T, d) batch and, when ``B`` is not a multiple of
    ``group_size``, over the last ``B % group_size`` sequences as one smaller group (a group of one
    mixes nothing: every expert sees the token itself, the dense MLP)."""
    B, r = x.shape[0], x.shape[0] % group_size
    if not r:
        return fn(x, group_size)
    if group_size > B:
        return fn(x, B)
    return torch.cat([fn(x[: B - r], group_size), fn(x[B - r :], r)])


def mot_mlp(
    x: torch.Tensor,
    w: dict[str, torch.Tensor | None],
    router: nn.Module,
    temperature: float | torch.Tensor,
    group_size: int,
    expert_size: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoT over a (B, T, d) batch, ``B`` a multiple of ``group_size`` (see :func:`by_groups`); returns
    the output (B, T, d_out) and the mixing weights (N, G, T, E)."""
    B, T, _ = x.shape
    wts, m = mix(x, router, temperature, group_size)
    s, E = expert_size, wts.shape[-1]
    up = torch.einsum("nted,esd->ntes", m, _blocks(w["up"], E, s))
    if w["b_up"] is not None:
        up = up + _blocks(w["b_up"], E, s)
    fn = ACTIVATIONS[act]
    if w["gate"] is None:
        h = fn(up)
    else:
        gate = torch.einsum("nted,esd->ntes", m, _blocks(w["gate"], E, s))
        if w["b_gate"] is not None:
            gate = gate + _blocks(w["b_gate"], E, s)
        h = fn(gate) * up
    down = w["down"]
    o = torch.einsum("ntes,oes->nteo", h, down.unflatten(1, (E, s)))  # (N, T, E, d_out)
    y = torch.einsum("ngte,nteo->ngto", wts, o).reshape(B, T, down.shape[0])
    return (y if w["b_down"] is None else y + w["b_down"]), wts


def mot_mlp_modules(
    x: torch.Tensor,
    mods: dict[str, nn.Module | None],
    router: nn.Module,
    temperature: float | torch.Tensor,
    group_size: int,
    expert_size: int,
    act: str,
) -> torch.Tensor:
    """:func:`mot_mlp` calling the projection modules: expert e's block of the hidden layer of its mixed
    input, weighted per token by ``w_ie``, and one ``down`` call (which adds its bias once)."""
    B, T, _ = x.shape
    wts, m = mix(x, router, temperature, group_size)
    N, G, _, E = wts.shape
    h = module_hidden(mods, m, act)  # (N, T, E, I): every block of every expert's mixed input
    hb = h.unflatten(-1, (E, expert_size)).diagonal(dim1=2, dim2=3).transpose(-1, -2)  # (N, T, E, s)
    mixed = torch.einsum("ngte,ntes->ngtes", wts, hb).reshape(N, G, T, E * expert_size)
    return mods["down"](mixed).reshape(B, T, -1)


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice routing of (T, E) scores: top-k expert indices (T, k) and gates (T, k), value 1,
    gradient of the softmax over the selected scores (straight-through)."""
    top = logits.topk(k, dim=-1)
    p = torch.softmax(top.values.float(), dim=-1)
    return top.indices, (1.0 + p - p.detach()).to(logits.dtype)


def moe_mlp(
    xf: torch.Tensor,
    w: dict[str, torch.Tensor | None],
    logits: torch.Tensor,
    k: int,
    expert_size: int,
    act: str,
) -> torch.Tensor:
    """Transitioned token-choice MoE over (T, d) tokens through ``condify.ops.expert_mlp``.

    The k choices of every token are laid out as k*T rows with one expert each, so one ``expert_mlp``
    call runs exactly the selected (token, expert) pairs (decode: the k selected blocks; prefill: tokens
    grouped per expert), and the gates weight each choice's output. The down bias is not included.
    """
    T, E = logits.shape
    idx, gates = route(logits, k)
    rows = xf.repeat(k, 1) if k > 1 else xf  # row j*T + t: choice j of token t
    mask = F.one_hot(idx.t().reshape(-1), E).bool()
    out = expert_mlp(rows, w["up"], w["down"], mask, expert_size, act,
                     w_gate=w["gate"], b_up=w["b_up"], b_gate=w["b_gate"])  # fmt: skip
    out = out.reshape(k, T, -1) * gates.t()[:, :, None]
    return out.sum(0)


def moe_mlp_modules(
    xf: torch.Tensor,
    mods: dict[str, nn.Module | None],
    logits: torch.Tensor,
    k: int,
    expert_size: int,
    act: str,
) -> torch.Tensor:
    """:func:`moe_mlp` calling the projection modules: ``down(h * g)`` with ``g`` the straight-through
    gates on the selected experts' blocks, 0 elsewhere (the down module adds its bias)."""
    idx, gates = route(logits, k)
    g = torch.zeros_like(logits).scatter(1, idx, gates)  # (T, E)
    h = module_hidden(mods, xf, act)
    return mods["down"](h * g.repeat_interleave(expert_size, dim=1).to(h.dtype))


def _contig(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
    """``expert_mlp`` reads blocks of contiguous up/gate rows and a contiguous or column-major down."""
    if t is None or t.is_contiguous() or (name == "down" and t.t().is_contiguous()):
        return t
    return t.contiguous()


def mot_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a converted MLP (installed as an instance method)."""
    st: MoTSite = self._condify_patch.state
    mods = mlp_modules(st.adapter, self)
    w = st.adapter.mlp_weights(self) if all_plain(mods) else None  # None: call the wrapped modules
    router: Controller = self.router
    if st.stage == "mot":
        if x.dim() != 3:
            raise ValueError(f"mot: expected hidden states (batch, seq, d), got shape {tuple(x.shape)}")
        t = scalar(router.temperature)
        if w is not None:
            y = by_groups(
                lambda p, g: mot_mlp(p, w, router, t, g, st.expert_size, st.activation)[0], x, st.group_size
            )
        else:
            y = by_groups(
                lambda p, g: mot_mlp_modules(p, mods, router, t, g, st.expert_size, st.activation),
                x,
                st.group_size,
            )
        if st.counter is not None:  # E expert evaluations per group (of up to G tokens)
            n = x.shape[0] * x.shape[1]
            st.count(-(-x.shape[0] // st.group_size) * x.shape[1] * st.experts, n * st.experts)
        return y
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    logits = router(xf)
    if w is None:
        out = moe_mlp_modules(xf, mods, logits, st.top_k, st.expert_size, st.activation)
    else:
        c = {k: _contig(k, v) for k, v in w.items()}
        out = moe_mlp(xf, c, logits, st.top_k, st.expert_size, st.activation)
        if w["b_down"] is not None:
            out = out + w["b_down"]
    if st.counter is not None:
        st.count(xf.shape[0] * st.top_k, xf.shape[0] * st.experts)
    return out.reshape(*shape[:-1], -1)


def converted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every MLP converted by mot."""
    return patched(model, METHOD)


def stage(model: nn.Module) -> str | None:
    """The stage of the converted MLPs (``"mot"`` or ``"moe"``), None if the model has none."""
    sites = converted(model)
    return sites[0][1]._condify_patch.state.stage if sites else None


def set_temperature(model: nn.Module, t: float) -> None:
    """Set the mixing temperature of every converted MLP."""
    if not t > 0:
        raise ValueError(f"mot: temperature must be > 0, got {t}")
    for _, m in converted(model):
        m.router.temperature.fill_(float(t))
