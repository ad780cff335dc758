"""Plain-torch reference of every condify kernel: the CPU execution path and the test oracle.

Nothing here imports Triton. All functions support autograd (they are made of differentiable torch ops).

``expert_mlp_reference`` picks one of three strategies (``strategy="auto"``), measured on a 2-core
AMD EPYC, fp32, SmolLM2 MLP shape (d=576, I=1536, SiLU-GLU); see ``benchmarks/results/expert_kernels_cpu.md``:

- ``"runs"``: per token, merge runs of consecutive selected experts into one contiguous slice of the
  weights and do one ``F.linear`` per run. Reads only the selected bytes, so it is what makes decode
  fast, but it pays a fixed cost per run (~15 us for the ~6 small torch calls), so it wins only while
  the number of runs is small relative to the bytes saved.
- ``"grouped"``: tokens grouped by expert (one sort of the mask), one matmul per run of experts over
  its tokens (ScatterMoE-style). Saves FLOPs at large T when experts are large enough for the small
  GEMMs to be efficient; loses to dense at fine granularity.
- ``"dense"``: every expert for every token, hidden activations of unselected experts zeroed. No data
  dependent control flow, so it is also the branch taken under ``torch.compile`` (fullgraph).

The ``"auto"`` rule is a cost model in units of "one expert's weights read for one token" with the
per-call overhead measured here; see ``_choose_strategy``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
Strategy = Literal["auto", "dense", "runs", "grouped"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------------------
# input checks (shared with the Triton path)
# ----------------------------------------------------------------------------------------------------------


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
    if tuple(w_down.shape) != (d, inter):
        raise ValueError(f"w_down must be ({d}, {inter}) in nn.Linear layout, got {tuple(w_down.shape)}")
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
    for name, w in named.items():
        if w is None:
            continue
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}; cast them to one dtype")
        if not w.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous (expert blocks are read as contiguous slices); call .contiguous()"
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


# ----------------------------------------------------------------------------------------------------------
# expert MLP
# ----------------------------------------------------------------------------------------------------------


def _hidden(
    x: Tensor,
    w_up: Tensor,
    w_gate: Tensor | None,
    b_up: Tensor | None,
    b_gate: Tensor | None,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    up = F.linear(x, w_up, b_up)
    if w_gate is None:
        return act(up)
    return act(F.linear(x, w_gate, b_gate)) * up


def _sl(t: Tensor | None, lo: int, hi: int) -> Tensor | None:
    return None if t is None else t[lo:hi]


def _runs(row: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive True entries."""
    runs, start = [], -1
    for e, on in enumerate(row):
        if on and start < 0:
            start = e
        elif not on and start >= 0:
            runs.append((start, e))
            start = -1
    if start >= 0:
        runs.append((start, len(row)))
    return runs


def _expert_mlp_dense(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate) -> Tensor:
    h = _hidden(x, w_up, w_gate, b_up, b_gate, act)
    keep = mask.repeat_interleave(s, dim=1)
    return F.linear(h.masked_fill(~keep, 0), w_down)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _expert_mlp_runs(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate, runs) -> Tensor:
    rows, acc_dtype = [], _acc_dtype(x)
    for t, token_runs in enumerate(runs):
        xt, acc = x[t : t + 1], None
        for a, b in token_runs:
            lo, hi = a * s, b * s
            h = _hidden(xt, w_up[lo:hi], _sl(w_gate, lo, hi), _sl(b_up, lo, hi), _sl(b_gate, lo, hi), act)
            y = F.linear(h, w_down[:, lo:hi]).to(acc_dtype)
            acc = y if acc is None else acc + y
        rows.append(acc if acc is not None else x.new_zeros(1, x.shape[1], dtype=acc_dtype))
    return torch.cat(rows).to(x.dtype)


def _expert_mlp_grouped(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate) -> Tensor:
    counts = mask.sum(0).tolist()
    tokens = mask.t().nonzero()[:, 1]  # expert-major order: the tokens of expert 0, then of expert 1, ...
    out = x.new_zeros(x.shape, dtype=_acc_dtype(x))
    # runs of consecutive experts selected by exactly the same tokens share one matmul
    start = 0
    groups: list[tuple[int, int, int, int]] = []  # (first expert, end expert, token offset, count)
    for e, c in enumerate(counts):
        if c == 0:
            start += c
            continue
        if groups and groups[-1][1] == e and groups[-1][3] == c and torch.equal(mask[:, e], mask[:, e - 1]):
            a, _, off, _ = groups[-1]
            groups[-1] = (a, e + 1, off, c)
        else:
            groups.append((e, e + 1, start, c))
        start += c
    T = x.shape[0]
    for a, b, off, c in groups:
        lo, hi = a * s, b * s
        idx = tokens[off : off + c]
        xs = x if c == T else x.index_select(0, idx)
        h = _hidden(xs, w_up[lo:hi], _sl(w_gate, lo, hi), _sl(b_up, lo, hi), _sl(b_gate, lo, hi), act)
        y = F.linear(h, w_down[:, lo:hi]).to(out.dtype)
        out = out + y if c == T else out.index_add(0, idx, y)
    return out.to(x.dtype)


# Cost model for "auto", in units of one expert-token (s neurons x d x 3 matrices of weights), with the
# per-call overhead expressed in the same unit. Measured on the 2-core EPYC (fp32): one run costs ~15 us
# of fixed overhead; reading/computing 1 neuron x d=576 x 3 matrices for one token costs ~0.1 us.
_CALL_OVERHEAD_NEURON_D = 150 * 576  # overhead of one run ~ 150 neurons x 576 inputs of weights
_RUNS_MAX_TOKENS = 8


def _choose_strategy(mask: Tensor, s: int, d: int, runs: list[list[tuple[int, int]]] | None) -> str:
    T, E = mask.shape
    work = int(mask.sum())
    if work >= T * E:
        return "dense"
    dense_cost = T * E * s * d
    overhead = _CALL_OVERHEAD_NEURON_D
    if runs is not None:
        n_runs = sum(len(r) for r in runs)
        if work * s * d + n_runs * overhead < dense_cost:
            return "runs"
        return "dense"
    # grouped: one call per selected expert; each pays the overhead plus small-GEMM inefficiency when
    # the expert is narrow (s < 64 does not fill the CPU GEMM micro-kernel well).
    n_groups = int((mask.sum(0) > 0).sum())
    eff = min(1.0, s / 64)
    if work * s * d / eff + n_groups * overhead < dense_cost:
        return "grouped"
    return "dense"


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
    *,
    strategy: Strategy = "auto",
) -> Tensor:
    """Dynamic expert FFN in plain torch: ``out[t] = sum over selected e of W_down[:, blk_e] h_e(x[t])``.

    Reads only the selected experts' contiguous weight blocks (slicing views, never a gathered copy).
    Under ``torch.compile`` the data-independent ``"dense"`` strategy is used so the graph has no breaks.
    """
    check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)
    act = ACTIVATIONS[activation]
    args = (x, w_up, w_down, mask, expert_size, act, w_gate, b_up, b_gate)
    if torch.compiler.is_compiling() or strategy == "dense":
        return _expert_mlp_dense(*args)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    runs = None
    if strategy == "runs" or (strategy == "auto" and x.shape[0] <= _RUNS_MAX_TOKENS):
        runs = [_runs(row) for row in mask.tolist()]
    if strategy == "auto":
        strategy = _choose_strategy(mask, expert_size, x.shape[1], runs)  # type: ignore[assignment]
    if strategy == "runs":
        return _expert_mlp_runs(*args, runs)
    if strategy == "grouped":
        return _expert_mlp_grouped(*args)
    return _expert_mlp_dense(*args)


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


def scatter_tokens_reference(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None = None
) -> Tensor:
    """``out = base`` with ``out[b, index[b, k]] += scale[b, k] * update[b, k]`` for ``k < count[b]``.

    Rows ``k >= count[b]`` are ignored (their index may be anything). Valid indices of a row must be unique.
    """
    check_scatter_tokens_args(base, update, index, count, scale)
    K = update.shape[1]
    valid = torch.arange(K, device=base.device) < count[:, None]  # (B, K)
    f = _acc_dtype(base)
    upd = update.to(f) if scale is None else update.to(f) * scale.to(f)[..., None]
    upd = torch.where(valid[..., None], upd, 0)
    idx = torch.where(valid, index, 0)[..., None].expand_as(upd)
    return base.to(f).scatter_add(1, idx, upd).to(base.dtype)
