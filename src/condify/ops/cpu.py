"""CPU execution of the expert ops: the compiled kernel (``csrc/sparse_ffn.cpp``) and the tuned plain-torch
fallback. These are the implementations registered as the CPU kernels of ``condify::expert_mlp`` and
``condify::sparse_ffn`` (see ``_dispatch.py``); the test oracle lives in ``reference.py``.

Which path runs, per call:

- the compiled kernel (router + selection + experts in one C++ call, PowerInfer-style: each thread reads
  its share of the selected experts' contiguous weight blocks once and accumulates into its own fp32
  buffer) for few tokens, i.e. decode and small batches (up to 8 tokens, or while tokens x executed
  fraction <= 64: see ``_use_kernel``), fp32/bf16;
- otherwise the plain-torch strategies below (MKL GEMMs): "spans", "grouped" (by expert) or masked
  "dense", chosen per call from the shape and the selection density.

The kernel is built on first use with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja;
cached under the torch extensions dir, ``TORCH_EXTENSIONS_DIR``). ``CONDIFY_CPU_KERNEL=1`` requires it
(error if it cannot be built), ``0`` forces plain torch; unset: compiled when it builds, else plain torch
with one warning.

Plain-torch strategies (``expert_mlp_torch``): a small cost model (``_choose_strategy``) fitted on a
2-core AMD EPYC, fp32, SmolLM2 MLP (d=576, I=1536, SiLU-GLU); numbers in
``benchmarks/results/expert_kernels_cpu.md``:

- ``"spans"``: the union of the experts selected by the tokens, as runs of consecutive experts, each run
  one contiguous slice of the weights (views, never copies) and one chain of ``F.linear`` calls. A gap of
  unselected experts between two runs is bridged (computed, then masked) when streaming it costs less than
  one more call chain (~45 us of torch overhead here, i.e. ~64 neurons of weights at d=576).
- ``"grouped"``: tokens grouped by expert (ScatterMoE-style: one sort of the mask), one matmul chain per
  expert over its tokens (activations are gathered, weights are sliced). Saves FLOPs in prefill when
  experts are wide enough for small GEMMs to run near peak (measured 1.3x at 50 % and 2.3x at 25 % for
  128-neuron experts, 512 tokens, 1 thread); loses to dense for narrow experts or few tokens.
- ``"dense"``: every expert for every token, the hidden activations of unselected experts zeroed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import (
    ACTIVATIONS,
    check_expert_mlp_args,
    check_sparse_ffn_args,
    router_scores_reference,
    select_experts_reference,
)

Strategy = Literal["auto", "spans", "grouped", "dense"]
ACT_IDS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
RULE_IDS = {"tau_max": 0, "sigmoid": 1}
ENV = "CONDIFY_CPU_KERNEL"

# ----------------------------------------------------------------------------------------------------------
# the compiled kernel: build on first use, or fall back
# ----------------------------------------------------------------------------------------------------------

_SOURCE = Path(__file__).parent / "csrc" / "sparse_ffn.cpp"
_ext: Any = None
_ext_error: str | None = None
_warned = False


def _cpu_tag() -> str:
    """A short hash of this CPU's features: the kernel is built with -march=native, so a build cached in a
    home directory shared between different machines must not be loaded on a CPU that lacks them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:6]


STALE_LOCK_S = 900.0


def clear_stale_lock(name: str, older_than_s: float = STALE_LOCK_S) -> bool:
    """Remove the ``lock`` file a killed build of extension ``name`` left behind (torch's builder waits on
    it forever); one younger than ``older_than_s`` may be a build in progress and stays. Returns whether
    one was removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, False)) / "lock"
        if time.time() - lock.stat().st_mtime <= older_than_s:
            return False
        lock.unlink()
    except (ImportError, OSError):  # no lock (the usual case), or torch moved its helper
        return False
    warnings.warn(f"condify: removed a stale build lock {lock} (a build was killed)", stacklevel=2)
    return True


def _build() -> Any:
    from torch.utils.cpp_extension import load

    tag = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:10]
    common = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"]
    err: Exception | None = None
    for arch, suffix in ((["-march=native"], _cpu_tag()), ([], "generic")):  # generic if -march=native fails
        clear_stale_lock(f"condify_cpu_{tag}_{suffix}")
        try:
            return load(
                name=f"condify_cpu_{tag}_{suffix}",
                sources=[str(_SOURCE)],
                extra_cflags=common + arch,
                extra_ldflags=["-fopenmp"],
                verbose=os.environ.get("CONDIFY_CPU_KERNEL_VERBOSE") == "1",
            )
        except Exception as e:
            err = e
    assert err is not None
    raise err


def extension() -> Any:
    """The compiled kernel module, or None (forced off, or it cannot be built: plain torch then).

    ``CONDIFY_CPU_KERNEL=1`` raises instead of returning None; ``=0`` always returns None.
    """
    global _ext, _ext_error, _warned
    mode = os.environ.get(ENV, "")
    if mode == "0":
        return None
    if _ext is None and _ext_error is None:
        try:
            _ext = _build()
        except Exception as e:  # no compiler, no ninja, headers missing, ...
            _ext_error = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
    if _ext is not None:
        return _ext
    if mode == "1":
        raise RuntimeError(f"{ENV}=1 but condify's CPU kernel could not be built: {_ext_error}")
    if not _warned:
        _warned = True
        warnings.warn(
            "condify: the compiled CPU kernel could not be built, expert layers run in plain torch "
            "(slower decode). For the fast path install a C++ compiler (g++ or clang) and `pip install "
            f"ninja`, then restart; set {ENV}=0 to silence this. Build error: {_ext_error[:300]}",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def kernel_available() -> bool:
    """True if the compiled kernel is (or can be) used, honouring ``CONDIFY_CPU_KERNEL``."""
    return extension() is not None


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


# Strategy per shape (crossover measured in benchmarks/results/cpu_kernels.md, SmolLM2 MLP, 32-neuron
# experts, 50 % random per token, 1 thread, after the register-blocked down projection: the kernel
# x1.9 / x1.6 / x1.3 / x1.2 / x1.05 / x1.02 / x0.95 at 1 / 8 / 16 / 32 / 64 / 128 / 512 tokens, MKL
# masked-dense x0.95-1.05 from 64 tokens on): the compiled kernel reads each selected expert once for all
# its tokens and runs their dot products from L1, so it wins while the work per expert, tokens x executed
# fraction, is small; past that the MKL GEMMs of "dense" (masked) or "grouped" run as fast or faster.
_KERNEL_ALWAYS_TOKENS = 8  # always the kernel up to here (decode, small batches)
_KERNEL_MAX_PAIRS = 64.0  # else the kernel while tokens x executed fraction <= this
_FUSED_MAX_TOKENS = 64  # sparse_ffn: the one-call router + selection + experts up to here


def _use_kernel(x: Tensor, mask: Tensor) -> bool:
    T = x.shape[0]
    if T == 0 or x.dtype not in _KERNEL_DTYPES:
        return False
    if bool(mask.all()):
        # every expert for every token (e.g. tau = 0): the dense MLP in torch reads the same bytes as fast
        # and sums in the dense model's order, so a converted model at tau = 0 gives the dense logits
        return False
    if T <= _KERNEL_ALWAYS_TOKENS:
        return True
    return float(mask.sum()) / mask.shape[1] <= _KERNEL_MAX_PAIRS  # tokens x executed fraction


def _contig(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def expert_mlp_cpu(
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
    """CPU kernel of ``condify::expert_mlp``: the compiled kernel for few tokens, else plain torch."""
    if _use_kernel(x, mask):
        ext = extension()
        if ext is not None:
            return ext.expert_mlp(
                x,
                w_up,
                w_down,
                mask,
                expert_size,
                ACT_IDS[activation],
                w_gate,
                _contig(b_up),
                _contig(b_gate),
            )
    return expert_mlp_torch(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)


def sparse_ffn_cpu(
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
    """CPU kernel of ``condify::sparse_ffn``: one compiled call (router, selection, experts) for few
    tokens; else router scores in fp32 with torch, the selection, and :func:`expert_mlp_cpu`."""
    T = x.shape[0]
    if 0 < T <= _FUSED_MAX_TOKENS and x.dtype in _KERNEL_DTYPES:
        ext = extension()
        if ext is not None and r_w1.dtype in _KERNEL_DTYPES:
            out, mask = ext.sparse_ffn(
                x, r_w1, _contig(r_b1), _contig(r_w2), _contig(r_b2), RULE_IDS[rule], float(threshold),
                w_up, w_down, expert_size, ACT_IDS[activation], w_gate, _contig(b_up), _contig(b_gate),
            )  # fmt: skip
            return out, mask
    check_sparse_ffn_args(x, r_w1, r_b1, r_w2, r_b2, rule, w_up, w_down, expert_size, activation, w_gate)
    mask = select_experts_reference(router_scores_reference(x, r_w1, r_b1, r_w2, r_b2), rule, threshold)
    return expert_mlp_cpu(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate), mask


# ----------------------------------------------------------------------------------------------------------
# plain-torch strategies (the fallback, and the large-batch / prefill path)
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
    if h.requires_grad:  # out of place (relu's backward needs its output)
        h = torch.where(mask[:, :, None], h.unflatten(1, (-1, s)), 0).flatten(1)
    else:  # in place, one pass, no new (T, I) tensor: ~2 % over the dense MLP instead of ~5-10 %
        h.view(h.shape[0], -1, s).mul_(mask[:, :, None])
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
    """``expert_mlp_torch`` for one token ``x`` (1, d) whose selection is a Python list of E bools:
    the "spans" strategy without building or reading a mask tensor (the batch-1 decode path).

    Same result as ``expert_mlp_torch(x, ..., torch.tensor([selected]), ...)``. The arguments are not
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


def expert_mlp_torch(
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
