"""Plain-torch oracles of every condify kernel: a few readable lines each, used by the tests (naive loop ->
these -> the CPU kernel / Triton) and as the definition of what each op computes.

Nothing here imports Triton. Every function is made of differentiable torch ops (autograd works). The
tuned CPU execution (compiled kernel and plain-torch strategies) lives in ``cpu.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
Rule = Literal["tau_max", "sigmoid"]
RULES = ("tau_max", "sigmoid")

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------------------
# input checks (shared with the Triton path)
# ----------------------------------------------------------------------------------------------------------


def _blocks_contiguous(name: str, w: Tensor) -> bool:
    """Every expert block of ``w`` is one contiguous piece: rows of up/gate; columns of ``w_down``
    (column-major, i.e. ``w_down.t()`` contiguous, is the layout dynamic-k stores), or all of it."""
    return w.is_contiguous() or (name == "w_down" and w.t().is_contiguous())


def check_expert_mlp_args(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    mask: Tensor,
    expert_size: int,
    activation: str,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> int:
    """Validate the arguments of ``expert_mlp``; return the number of experts E."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {tuple(x.shape)}")
    T, d = x.shape
    if w_up.dim() != 2 or w_up.shape[1] != d:
        raise ValueError(f"w_up must be (intermediate, {d}) in nn.Linear layout, got {tuple(w_up.shape)}")
    inter = w_up.shape[0]
    if w_down.dim() != 2 or w_down.shape[1] != inter:
        raise ValueError(f"w_down must be (d_out, {inter}) in nn.Linear layout, got {tuple(w_down.shape)}")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate must have the shape of w_up {tuple(w_up.shape)}, got {tuple(w_gate.shape)}")
    if expert_size <= 0 or inter % expert_size != 0:
        raise ValueError(
            f"the intermediate size {inter} is not a multiple of expert_size={expert_size}: "
            "experts must be equal contiguous blocks of neurons"
        )
    E = inter // expert_size
    if mask.dtype != torch.bool or tuple(mask.shape) != (T, E):
        raise ValueError(
            f"mask must be a bool tensor of shape (tokens, experts) = ({T}, {E}), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    named = {"w_up": w_up, "w_down": w_down, "w_gate": w_gate, "b_up": b_up, "b_gate": b_gate}
    dt, dev = x.dtype, x.device
    if mask.device == dev and all(
        w is None or (w.dtype == dt and w.device == dev and _blocks_contiguous(n, w))
        for n, w in named.items()
    ):
        named = {}  # fast path: nothing to report
    for name, w in named.items():
        if w is None:
            continue
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}; cast them to one dtype")
        if not _blocks_contiguous(name, w):
            raise ValueError(
                f"{name} must be contiguous{' or column-major' if name == 'w_down' else ''} (expert blocks "
                "are read as contiguous slices); call .contiguous()"
            )
        if w.device != x.device or mask.device != x.device:
            raise ValueError(
                f"{name}, mask and x must be on one device, got {w.device}, {mask.device}, {x.device}"
            )
    for name, b in (("b_up", b_up), ("b_gate", b_gate)):
        if b is not None and tuple(b.shape) != (inter,):
            raise ValueError(f"{name} must have shape ({inter},), got {tuple(b.shape)}")
    if b_gate is not None and w_gate is None:
        raise ValueError("b_gate given without w_gate")
    return E


def check_sparse_ffn_args(
    x: Tensor,
    r_w1: Tensor,
    r_b1: Tensor | None,
    r_w2: Tensor | None,
    r_b2: Tensor | None,
    rule: str,
    w_up: Tensor,
    w_down: Tensor,
    expert_size: int,
    activation: str,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> int:
    """Validate the arguments of ``sparse_ffn`` (router and experts); return the number of experts E."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {RULES}")
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {tuple(x.shape)}")
    inter = w_up.shape[0] if w_up.dim() == 2 else -1
    E = inter // expert_size if expert_size > 0 else -1
    n1 = r_w1.shape[0]
    if r_w1.dim() != 2 or r_w1.shape[1] != x.shape[1]:
        raise ValueError(f"router weight must be (n, {x.shape[1]}), got {tuple(r_w1.shape)}")
    if r_w2 is None and n1 != E:
        raise ValueError(f"a one-layer router must have E={E} outputs, got {n1}")
    if r_w2 is not None and tuple(r_w2.shape) != (E, n1):
        raise ValueError(f"router second weight must be ({E}, {n1}), got {tuple(r_w2.shape)}")
    mask = torch.empty(x.shape[0], max(E, 0), dtype=torch.bool, device=x.device)
    return check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)


# ----------------------------------------------------------------------------------------------------------
# expert MLP, router, selection
# ----------------------------------------------------------------------------------------------------------


def expert_mlp_reference(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    mask: Tensor,
    expert_size: int,
    activation: str,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> Tensor:
    """The definition of ``expert_mlp``: the dense hidden layer in fp32 (at least), unselected experts'
    activations zeroed, the down projection; output in x's dtype. Reads every weight (an oracle, not a
    fast path: see ``condify.ops.cpu``)."""
    check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)
    f, act = torch.promote_types(x.dtype, torch.float32), ACTIVATIONS[activation]

    def lin(w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x.to(f), w.to(f), None if b is None else b.to(f))

    h = act(lin(w_up, b_up)) if w_gate is None else act(lin(w_gate, b_gate)) * lin(w_up, b_up)
    h = h * mask.repeat_interleave(expert_size, dim=1).to(f)
    return F.linear(h, w_down.to(f)).to(x.dtype)


def router_scores_reference(
    x: Tensor, r_w1: Tensor, r_b1: Tensor | None, r_w2: Tensor | None, r_b2: Tensor | None
) -> Tensor:
    """Router scores in fp32 (at least): ``|W2 relu(W1 x + b1) + b2|`` with a second layer (dynamic-k's
    ``Linear -> ReLU -> Linear -> abs``), else ``W1 x + b1`` (lte's logits)."""
    f = torch.promote_types(x.dtype, torch.float32)

    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(f)

    z = F.linear(x.to(f), c(r_w1), c(r_b1))
    return z if r_w2 is None else F.linear(F.relu(z), c(r_w2), c(r_b2)).abs()


def select_experts_reference(scores: Tensor, rule: str, threshold: float | Tensor) -> Tensor:
    """(T, E) bool: ``"tau_max"``: ``score >= threshold * max`` and the argmax (dynamic-k);
    ``"sigmoid"``: ``sigmoid(score) >= threshold`` (lte; a token may select no expert)."""
    if rule == "sigmoid":
        return torch.sigmoid(scores) >= threshold
    if rule != "tau_max":
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {RULES}")
    top = scores.max(-1, keepdim=True)
    return (scores >= top.values * threshold).scatter_(-1, top.indices, True)


def sparse_ffn_reference(
    x: Tensor,
    r_w1: Tensor,
    r_b1: Tensor | None,
    r_w2: Tensor | None,
    r_b2: Tensor | None,
    rule: str,
    threshold: float,
    w_up: Tensor,
    w_down: Tensor,
    expert_size: int,
    activation: str,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The definition of ``sparse_ffn``: router scores (fp32), the selection rule, ``expert_mlp``.
    Returns ``(out, mask)``."""
    check_sparse_ffn_args(x, r_w1, r_b1, r_w2, r_b2, rule, w_up, w_down, expert_size, activation, w_gate)
    mask = select_experts_reference(router_scores_reference(x, r_w1, r_b1, r_w2, r_b2), rule, threshold)
    return expert_mlp_reference(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate), mask


# ----------------------------------------------------------------------------------------------------------
# token compaction (mod-threshold)
# ----------------------------------------------------------------------------------------------------------


def compact_tokens_reference(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Stable partition of each row: kept positions in increasing order, then the skipped ones.

    Returns ``index`` (B, T) int64 and ``count`` (B,) int64 with ``index[b, :count[b]]`` the kept positions.
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (batch, tokens) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    k = keep.long()
    kept_before = k.cumsum(1) - k  # exclusive prefix sum
    count = k.sum(1)
    t = torch.arange(keep.shape[1], device=keep.device).expand_as(k)
    pos = torch.where(keep, kept_before, count[:, None] + t - kept_before)
    return torch.empty_like(k).scatter_(1, pos, t), count


def check_scatter_tokens_args(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None
) -> None:
    if base.dim() != 3:
        raise ValueError(f"base must be (batch, tokens, hidden), got shape {tuple(base.shape)}")
    B, _, D = base.shape
    if update.dim() != 3 or update.shape[0] != B or update.shape[2] != D:
        raise ValueError(f"update must be ({B}, K, {D}), got {tuple(update.shape)}")
    K = update.shape[1]
    if tuple(index.shape) != (B, K) or index.dtype != torch.int64:
        raise ValueError(f"index must be int64 of shape ({B}, {K}), got {index.dtype} {tuple(index.shape)}")
    if tuple(count.shape) != (B,) or count.dtype != torch.int64:
        raise ValueError(f"count must be int64 of shape ({B},), got {count.dtype} {tuple(count.shape)}")
    if scale is not None and tuple(scale.shape) != (B, K):
        raise ValueError(f"scale must have shape ({B}, {K}), got {tuple(scale.shape)}")
    if update.dtype != base.dtype or (scale is not None and scale.dtype != base.dtype):
        raise TypeError("base, update and scale must share one dtype")
    for name, t in (("update", update), ("index", index), ("count", count), ("scale", scale)):
        if t is not None and t.device != base.device:
            raise ValueError(f"{name} is on {t.device} but base is on {base.device}")


def scatter_tokens_reference(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None = None
) -> Tensor:
    """``out = base`` with ``out[b, index[b, k]] += scale[b, k] * update[b, k]`` for ``k < count[b]``.

    Rows ``k >= count[b]`` are ignored (their index may be anything). Valid indices of a row must be unique.
    """
    check_scatter_tokens_args(base, update, index, count, scale)
    K = update.shape[1]
    valid = torch.arange(K, device=base.device) < count[:, None]  # (B, K)
    f = torch.promote_types(base.dtype, torch.float32)
    upd = update.to(f) if scale is None else update.to(f) * scale.to(f)[..., None]
    upd = torch.where(valid[..., None], upd, 0)
    idx = torch.where(valid, index, 0)[..., None].expand_as(upd)
    return base.to(f).scatter_add(1, idx, upd).to(base.dtype)


# Names that lived here before the split (the tuned plain-torch CPU path moved to ``cpu.py``).
_MOVED = ("expert_mlp_decode", "expert_mlp_torch", "Strategy")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from . import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
