"""Plain-torch reference of every condify kernel: the CPU execution path and the test oracle.

Nothing here imports Triton. Every function is made of differentiable torch ops (autograd works).

``expert_mlp_reference`` has three strategies; ``strategy="auto"`` picks one per call with a small cost
model (``_choose_strategy``) fitted on a 2-core AMD EPYC, fp32, SmolLM2 MLP (d=576, I=1536, SiLU-GLU);
numbers in ``benchmarks/results/expert_kernels_cpu.md``:

- ``"spans"``: the union of the experts selected by the tokens, as runs of consecutive experts, each run
  one contiguous slice of the weights (views, never copies) and one chain of ``F.linear`` calls. A gap of
  unselected experts between two runs is bridged (computed, then masked) when streaming it costs less than
  one more call chain (~45 us of torch overhead here, i.e. ~64 neurons of weights at d=576). This is what
  saves time in decode (few tokens, memory-bound): only the selected blocks are read. With one token and
  the whole layer selected it is exactly the dense MLP.
- ``"grouped"``: tokens grouped by expert (ScatterMoE-style: one sort of the mask), one matmul chain per
  expert over its tokens (activations are gathered, weights are sliced). Saves FLOPs in prefill when
  experts are wide enough for small GEMMs to run near peak (measured 1.3x at 50 % and 2.3x at 25 % for
  128-neuron experts, 512 tokens, 1 thread); loses to dense for narrow experts or few tokens. It issues
  ~5 multi-threaded ops per expert, so on an oversubscribed machine (more busy threads than cores) each
  can wait a scheduler quantum: set ``torch.set_num_threads`` to the free cores there.
- ``"dense"``: every expert for every token, the hidden activations of unselected experts zeroed. No data
  dependent control flow, so it is also the branch taken under ``torch.compile`` (fullgraph=True).

Decode, batch 1, 50 % executed (1 thread): 1.07x for random 128-neuron experts, 1.4-1.5x when the
selected experts are contiguous, ~0.85x (dense fallback) for random 8-32-neuron experts. Limits of the CPU
path, not fixable in plain torch: random selections of narrow experts fragment into many short runs, and
~10 torch calls per run cost more than the bytes saved; and ``w_down`` in nn.Linear layout (d, I) makes an
expert's down-projection block a column slice (strided rows), which streams at ~1.35x for half the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
Strategy = Literal["auto", "spans", "grouped", "dense"]

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


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _span_hidden(x, w_up, w_gate, b_up, b_gate, act, lo: int, hi: int) -> Tensor:
    """Hidden activations of neurons [lo, hi): slices of the weights (views, never copies)."""
    return _hidden(x, w_up[lo:hi], _sl(w_gate, lo, hi), _sl(b_up, lo, hi), _sl(b_gate, lo, hi), act)


def _add(out: Tensor | None, y: Tensor, acc_dtype: torch.dtype) -> Tensor:
    """Accumulate one span's output in ``acc_dtype`` (fp32 at least)."""
    y = y if y.dtype == acc_dtype else y.to(acc_dtype)
    return y if out is None else out + y


def _result(out: Tensor | None, x: Tensor, d_out: int) -> Tensor:
    """The accumulated output in x's dtype (zeros when no span ran)."""
    if out is None:
        return x.new_zeros(x.shape[0], d_out)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# Cost model of "auto", in units of weight elements streamed for one token. Measured on the 2-core EPYC
# (fp32, 1 thread, CPU time, weights cold in DRAM): one neuron of the SmolLM2 MLP (3 x 576 weights) costs
# ~0.66 us, and one more span (~10 torch calls: slices, up, gate, act, mul, down, add) ~45 us, i.e. as much
# as streaming ~64 neurons x 3 x 576 weights. Past ~16 tokens the MLP is compute-bound, so the per-neuron
# cost grows with T and the fixed cost of a call matters less.
_CALL_COST = 64 * 3 * 576
# Spans must be predicted 10 % cheaper than dense: an expert's down-projection block is a column slice of
# w_down (d, I), so its rows are read in short strided pieces, slower per byte than the dense matrix
# (half of the columns took ~74 % of the full time here).
_SPANS_MAX_COST = 0.9
_MEMORY_BOUND_TOKENS = 16
_GROUPED_MIN_TOKENS = 32
_GROUPED_MIN_SPEEDUP = 1.1


def _neuron_cost(d: int, T: int) -> float:
    return 3 * d * max(1.0, T / _MEMORY_BOUND_TOKENS)


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


def _spans(mask: Tensor, s: int, d: int) -> list[tuple[int, int, bool]]:
    """Spans [a, b) of experts covering every expert some token selected, with a flag "needs masking".

    Runs of the union of the tokens' selections; a gap of unselected experts between two runs is bridged
    (computed, then masked out) when streaming it is cheaper than one more call. A span needs masking when
    it bridged a gap or when some token did not select all of its experts.
    """
    T = mask.shape[0]
    if T == 1:
        used = full = mask[0].tolist()
    else:
        counts = mask.sum(0).tolist()
        used, full = [c > 0 for c in counts], [c == T for c in counts]
    return [(a, b, not all(full[a:b])) for a, b in _bridged(used, _gap_max(s, d, T))]


def _gap_max(s: int, d: int, T: int) -> int:
    """Longest gap of unselected experts worth computing (and masking) instead of one more call chain."""
    return int(_CALL_COST // (s * _neuron_cost(d, T)))


def _bridged(used: list[bool], gap_max: int) -> list[tuple[int, int]]:
    """Runs of ``used``, neighbours joined across gaps of at most ``gap_max`` experts."""
    spans: list[tuple[int, int]] = []
    for a, b in _runs(used):
        if spans and a - spans[-1][1] <= gap_max:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def _expert_mlp_dense(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate) -> Tensor:
    h = _hidden(x, w_up, w_gate, b_up, b_gate, act)
    h = torch.where(mask[:, :, None], h.unflatten(1, (-1, s)), 0).flatten(1)
    return F.linear(h, w_down)


def _expert_mlp_spans(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate, spans) -> Tensor:
    """One contiguous slice of the weights per span (views, no copies): up/gate rows, down columns."""
    drop = mask.logical_not().repeat_interleave(s, dim=1) if any(m for _, _, m in spans) else None
    acc_dtype, E = _acc_dtype(x), mask.shape[1]
    out = None
    for a, b, needs_mask in spans:
        if (a, b) == (0, E):  # the whole layer: no slicing
            h = _hidden(x, w_up, w_gate, b_up, b_gate, act)
            wd = w_down
        else:
            h = _span_hidden(x, w_up, w_gate, b_up, b_gate, act, a * s, b * s)
            wd = w_down[:, a * s : b * s]
        if needs_mask:
            h = h.masked_fill(drop[:, a * s : b * s], 0)
        out = _add(out, F.linear(h, wd), acc_dtype)
    return _result(out, x, w_down.shape[0])


def expert_mlp_decode(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    selected: list[bool],
    expert_size: int,
    activation: str,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> Tensor:
    """``expert_mlp_reference`` for one token ``x`` (1, d) whose selection is a Python list of E bools:
    the "spans" strategy without building or reading a mask tensor (the batch-1 decode path).

    Same result as ``expert_mlp_reference(x, ..., torch.tensor([selected]), ...)``. The arguments are not
    validated (this is the per-token hot path): check them once with :func:`check_expert_mlp_args`.
    """
    s, act = expert_size, ACTIVATIONS[activation]
    acc_dtype, out = _acc_dtype(x), None
    for a, b in _bridged(selected, _gap_max(s, x.shape[1], 1)):
        h = _span_hidden(x, w_up, w_gate, b_up, b_gate, act, a * s, b * s)
        for g0, g1 in _runs([not on for on in selected[a:b]]):  # bridged gaps: computed, then dropped
            h[:, g0 * s : g1 * s] = 0
        out = _add(out, F.linear(h, w_down[:, a * s : b * s]), acc_dtype)
    return _result(out, x, w_down.shape[0])


def _expert_mlp_grouped(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate) -> Tensor:
    """ScatterMoE-style: tokens grouped by expert (one sort of the mask), one matmul chain per expert."""
    counts = mask.sum(0).tolist()
    tokens = mask.t().nonzero()[:, 1]  # expert-major order: the tokens of expert 0, then of expert 1, ...
    out = x.new_zeros(x.shape[0], w_down.shape[0], dtype=_acc_dtype(x))
    T, start = x.shape[0], 0
    for e, c in enumerate(counts):
        if c:
            lo, hi, idx = e * s, (e + 1) * s, tokens[start : start + c]
            xs = x if c == T else x.index_select(0, idx)  # gathers activations, never weights
            h = _span_hidden(xs, w_up, w_gate, b_up, b_gate, act, lo, hi)
            y = F.linear(h, w_down[:, lo:hi]).to(out.dtype)
            out = out + y if c == T else out.index_add(0, idx, y)
        start += c
    return out.to(x.dtype)


def _grouped_speedup(mask: Tensor, s: int) -> float:
    """Predicted dense/grouped time ratio: small GEMMs (narrow experts, few tokens each) run below peak,
    and gathering/scattering the activations costs ~40 % on top (fitted on the EPYC, 1-2 threads)."""
    T, E = mask.shape
    counts = mask.sum(0)
    work = int(counts.sum())
    if work == 0:
        return float("inf")
    t_e = work / max(1, int((counts > 0).sum()))
    eff = min(1.0, s / 128) ** 0.5 * min(1.0, t_e / 128) ** 0.25
    return T * E / (1.4 * work / eff)


def _choose_strategy(mask: Tensor, s: int, d: int) -> tuple[str, list[tuple[int, int, bool]]]:
    T, E = mask.shape
    spans = _spans(mask, s, d)
    per_neuron = _neuron_cost(d, T)
    spans_cost = sum(_CALL_COST + (b - a) * s * per_neuron for a, b, _ in spans)
    dense_cost = _CALL_COST + E * s * per_neuron
    if spans_cost < _SPANS_MAX_COST * dense_cost:
        return "spans", spans
    if T >= _GROUPED_MIN_TOKENS and _grouped_speedup(mask, s) > _GROUPED_MIN_SPEEDUP:
        return "grouped", spans
    if spans == [(0, E, False)]:  # every token took every expert: the dense MLP, without masking
        return "spans", spans
    return "dense", spans


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
    """Dynamic expert FFN in plain torch: ``out[t] = sum over selected e of W_down[:, blk_e] h_e(x[t])``
    (``w_down`` is (d_out, I); d_out may differ from x's width, e.g. an MLP replacing a projection).

    Reads only the needed experts' contiguous weight blocks (slicing views, never a gathered copy of
    weights). ``strategy``: "auto" (cost model, see the module docstring), "spans", "grouped" or "dense".
    Under ``torch.compile`` the data-independent "dense" strategy is used so the graph has no breaks.
    """
    check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)
    args = (x, w_up, w_down, mask, expert_size, ACTIVATIONS[activation], w_gate, b_up, b_gate)
    if torch.compiler.is_compiling() or strategy == "dense":
        return _expert_mlp_dense(*args)
    if strategy not in ("auto", "spans", "grouped"):
        raise ValueError(f"unknown strategy {strategy!r}; expected auto, spans, grouped or dense")
    if x.shape[0] == 0:
        return x.new_zeros(0, w_down.shape[0])
    spans = None
    if strategy == "auto":
        strategy, spans = _choose_strategy(mask, expert_size, x.shape[1])
    if strategy == "grouped":
        return _expert_mlp_grouped(*args)
    if strategy == "spans":
        return _expert_mlp_spans(*args, spans if spans is not None else _spans(mask, expert_size, x.shape[1]))
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
    f = _acc_dtype(base)
    upd = update.to(f) if scale is None else update.to(f) * scale.to(f)[..., None]
    upd = torch.where(valid[..., None], upd, 0)
    idx = torch.where(valid, index, 0)[..., None].expand_as(upd)
    return base.to(f).scatter_add(1, idx, upd).to(base.dtype)
