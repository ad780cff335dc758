"""Public ops. Each is one ``torch.library.custom_op`` (``torch.ops.condify.*``) so ``torch.compile`` traces
it as one opaque node (``register_fake``), autograd runs through it (``register_autograd``) and
``FlopCounterMode`` counts it (:func:`register_flop_formulas`), whatever device runs it:

- CUDA: the op's own body, the Triton kernels (``x_triton`` is that entry point);
- CPU: the kernel registered with ``torch.library.register_kernel(..., "cpu", ...)`` from ``cpu.py``:
  the compiled C++ kernel for few tokens, the tuned plain-torch strategies otherwise (or when no
  compiler is available).

``condify::sparse_ffn`` (router + selection + experts in one call, for inference) has the same shape:
its CPU kernel is one compiled call at decode; elsewhere it runs its torch definition.

Nothing here imports Triton: the kernel modules are imported on the first call that reaches a kernel.
CPU tensors go to the registered CPU kernels. The Triton bodies of ``compact_tokens`` / ``scatter_tokens``
accept CPU tensors only when ``TRITON_INTERPRET=1`` (that is how the tests run the kernels on a CPU:
Triton's interpreter executes them with numpy); ``x_triton`` itself insists on CUDA tensors; the Triton
expert kernel is tested on CPU through its launcher.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import cpu
from .reference import (
    check_expert_mlp_args,
    check_scatter_tokens_args,
    compact_tokens_reference,
    scatter_tokens_reference,
    sparse_ffn_reference,
)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_kernel_device(t: Tensor, op: str) -> None:
    if not t.is_cuda and not _interpreting():
        raise RuntimeError(
            f"condify::{op} runs Triton kernels and needs CUDA tensors, got {t.device} "
            "(set TRITON_INTERPRET=1 to run the kernels on CPU in Triton's interpreter, for tests)"
        )


def _require_cuda(t: Tensor, fn: str) -> None:
    if not t.is_cuda:
        raise ValueError(
            f"{fn} needs CUDA tensors, got {t.device}; use the dispatching op "
            f"({fn.removesuffix('_triton')}) or {fn.removesuffix('_triton')}_reference on CPU"
        )


# ----------------------------------------------------------------------------------------------------------
# expert_mlp
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("condify::expert_mlp", mutates_args=())
def _expert_mlp_op(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    mask: Tensor,
    expert_size: int,
    activation: str,
    w_gate: Tensor | None,
    b_up: Tensor | None,
    b_gate: Tensor | None,
) -> Tensor:
    check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)
    _require_kernel_device(x, "expert_mlp")
    from .triton.expert_mlp import expert_mlp_launch

    return expert_mlp_launch(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)


@_expert_mlp_op.register_fake
def _(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate):
    return x.new_empty(x.shape[0], w_down.shape[0])


torch.library.register_kernel("condify::expert_mlp", "cpu", cpu.expert_mlp_cpu)


def _expert_mlp_flops(
    x, w_up, w_down, mask, expert_size, activation, w_gate, *args, out_val=None, **kwargs
) -> int:
    """FLOPs the kernel executes: 2·(d_in per up/gate row + d_out per down column) per selected neuron."""
    neurons = int(mask.sum()) * expert_size
    return 2 * neurons * (x.shape[-1] * (2 if w_gate is not None else 1) + w_down.shape[0])


def register_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the custom ops (else it counts them as 0). Idempotent; called by
    :func:`condify.evaluate.executed_flops`. Not done at import: ``torch.utils.flop_counter`` imports triton."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.condify.expert_mlp not in flop_registry:
        register_flop_formula(torch.ops.condify.expert_mlp, get_raw=True)(_expert_mlp_flops)
    if torch.ops.condify.sparse_ffn not in flop_registry:
        register_flop_formula(torch.ops.condify.sparse_ffn, get_raw=True)(_sparse_ffn_flops)


def _act_and_grad(z: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """act(z) and act'(z), in z's dtype (callers pass fp32)."""
    if activation == "relu":
        return z.clamp_min(0), (z > 0).to(z.dtype)
    if activation == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1 + z * (1 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return z * cdf, cdf + z * pdf
    c = math.sqrt(2 / math.pi)  # gelu_tanh
    th = torch.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * z * (1 + th), 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * c * (1 + 3 * 0.044715 * z * z)


def _expert_mlp_setup_context(ctx, inputs, output) -> None:
    x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate = inputs
    ctx.save_for_backward(x, w_up, w_down, mask, w_gate, b_up, b_gate)
    ctx.expert_size, ctx.activation = expert_size, activation


def _expert_mlp_backward(ctx, grad: Tensor):
    """Backward with torch ops: recompute the pre-activations densely and mask unselected neurons.

    Dense matmuls on the full weights, no gathers, no host sync (so it also traces under torch.compile);
    it costs about 2x a dense MLP backward's FLOPs regardless of sparsity (a grouped backward is future work).
    Elementwise math in (at least) fp32; matmuls in the inputs' dtype.
    """
    x, w_up, w_down, mask, w_gate, b_up, b_gate = ctx.saved_tensors
    need = ctx.needs_input_grad
    dt, f = x.dtype, torch.promote_types(x.dtype, torch.float32)
    keep = mask.repeat_interleave(ctx.expert_size, dim=1)
    grad = grad.to(dt)
    up = torch.nn.functional.linear(x, w_up, b_up).to(f)
    dh = (grad @ w_down).to(f).masked_fill(~keep, 0)
    d_gate = None  # gradients w.r.t. the pre-activations, in f
    if w_gate is not None:
        a, da = _act_and_grad(torch.nn.functional.linear(x, w_gate, b_gate).to(f), ctx.activation)
        h, d_up, d_gate = a * up, dh * a, dh * up * da
    else:
        h, da = _act_and_grad(up, ctx.activation)
        d_up = dh * da
    h = h.masked_fill(~keep, 0).to(dt)
    dx = dw_up = dw_down = dw_gate = db_up = db_gate = None
    if b_up is not None and need[7]:
        db_up = d_up.sum(0).to(dt)
    if d_gate is not None and b_gate is not None and need[8]:
        db_gate = d_gate.sum(0).to(dt)
    d_up = d_up.to(dt)
    d_gate = d_gate.to(dt) if d_gate is not None else None
    if need[0]:
        dx = d_up @ w_up if d_gate is None else d_up @ w_up + d_gate @ w_gate
    if need[1]:
        dw_up = d_up.t() @ x
    if need[2]:
        dw_down = grad.t() @ h
    if d_gate is not None and need[6]:
        dw_gate = d_gate.t() @ x
    return dx, dw_up, dw_down, None, None, None, dw_gate, db_up, db_gate


_expert_mlp_op.register_autograd(_expert_mlp_backward, setup_context=_expert_mlp_setup_context)


def expert_mlp_triton(
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
    """Triton path of ``expert_mlp`` (CUDA tensors only); differentiable, traceable by torch.compile."""
    check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)
    _require_cuda(x, "expert_mlp_triton")
    return torch.ops.condify.expert_mlp(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)


def expert_mlp(
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
    """Dynamic expert FFN: ``out[t] = sum_{e: mask[t, e]} W_down[:, blk_e] h_e(x[t])``.

    ``x`` (T, d); ``w_up``/``w_gate`` (I, d) and ``w_down`` (d_out, I) in nn.Linear layout with expert e owning
    neurons [e*s, (e+1)*s); ``mask`` (T, I/s) bool; ``h_e = act(W_gate x + b_gate) * (W_up x + b_up)`` with a
    gate (GLU), else ``act(W_up x + b_up)``; activation in {"silu", "gelu", "gelu_tanh", "relu"}. The down
    projection's bias is not included. fp32 accumulation, output in x's dtype; a token with no expert gets 0.
    One custom op, ``torch.ops.condify.expert_mlp``: Triton kernels on CUDA tensors, the CPU kernel
    (compiled for few tokens, plain torch otherwise; ``condify.ops.cpu``) on CPU tensors.
    """
    check_expert_mlp_args(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)
    return torch.ops.condify.expert_mlp(x, w_up, w_down, mask, expert_size, activation, w_gate, b_up, b_gate)


# ----------------------------------------------------------------------------------------------------------
# sparse_ffn: router + selection + experts (inference)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("condify::sparse_ffn", mutates_args=())
def _sparse_ffn_op(
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
    w_gate: Tensor | None,
    b_up: Tensor | None,
    b_gate: Tensor | None,
) -> tuple[Tensor, Tensor]:
    args = (x, r_w1, r_b1, r_w2, r_b2, rule, threshold, w_up, w_down, expert_size, activation)
    out, mask = sparse_ffn_reference(*args, w_gate, b_up, b_gate)  # devices without a kernel of their own
    return out, mask


@_sparse_ffn_op.register_fake
def _(
    x, r_w1, r_b1, r_w2, r_b2, rule, threshold, w_up, w_down, expert_size, activation, w_gate, b_up, b_gate
):
    E = w_up.shape[0] // expert_size
    return x.new_empty(x.shape[0], w_down.shape[0]), x.new_empty(x.shape[0], E, dtype=torch.bool)


torch.library.register_kernel("condify::sparse_ffn", "cpu", cpu.sparse_ffn_cpu)


def _sparse_ffn_flops(x, r_w1, r_b1, r_w2, r_b2, rule, threshold, w_up, w_down, expert_size, activation,
                      w_gate, *args, out_val=None, **kwargs) -> int:  # fmt: skip
    """Router matmuls plus the experts the returned mask selected (as ``expert_mlp``)."""
    d, n1 = x.shape[-1], r_w1.shape[0]
    router = 2 * x.shape[0] * (d * n1 + (r_w2.shape[0] * n1 if r_w2 is not None else 0))
    neurons = int(out_val[1].sum()) * expert_size
    return router + 2 * neurons * (d * (2 if w_gate is not None else 1) + w_down.shape[0])


def sparse_ffn(
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
    """Router, selection and expert FFN in one op (inference: no autograd). Returns ``(out, mask)``.

    Router: ``scores = |W2 relu(W1 x + b1) + b2|`` when ``r_w2`` is given (dynamic-k), else
    ``W1 x + b1`` (lte), computed in fp32. ``rule``: ``"tau_max"`` (expert e runs iff
    ``score_e >= threshold * max score``, the argmax always runs) or ``"sigmoid"`` (iff
    ``sigmoid(score_e) >= threshold``). Then ``out = expert_mlp(x, ..., mask, ...)``. On CPU with few
    tokens this is one compiled call that reads only the selected experts' weights; the arguments are
    checked there (in C++), so this wrapper adds no per-call Python work.

    Not differentiable (the router's selection is discrete; train through ``expert_mlp``). In eager mode
    on CPU, with no dispatch mode active (e.g. ``FlopCounterMode``), the op's CPU kernel is called
    directly, without the dispatcher (~20 us less per call, i.e. per layer and decode step).
    """
    if (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    ):
        return cpu.sparse_ffn_cpu(
            x, r_w1, r_b1, r_w2, r_b2, rule, threshold, w_up, w_down, expert_size, activation, w_gate, b_up, b_gate
        )  # fmt: skip
    return torch.ops.condify.sparse_ffn(
        x, r_w1, r_b1, r_w2, r_b2, rule, threshold, w_up, w_down, expert_size, activation, w_gate, b_up, b_gate
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# compact_tokens / scatter_tokens
# ----------------------------------------------------------------------------------------------------------


def _check_keep(keep: Tensor) -> None:
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (batch, tokens) bool tensor, got {keep.dtype} {tuple(keep.shape)}")


@torch.library.custom_op("condify::compact_tokens", mutates_args=())
def _compact_tokens_op(keep: Tensor) -> tuple[Tensor, Tensor]:
    _check_keep(keep)
    _require_kernel_device(keep, "compact_tokens")
    from .triton.tokens import compact_tokens_launch

    return compact_tokens_launch(keep)


@_compact_tokens_op.register_fake
def _(keep):
    return keep.new_empty(keep.shape, dtype=torch.int64), keep.new_empty(keep.shape[0], dtype=torch.int64)


def compact_tokens_triton(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Triton path of ``compact_tokens`` (CUDA tensors only)."""
    _check_keep(keep)
    _require_cuda(keep, "compact_tokens_triton")
    return torch.ops.condify.compact_tokens(keep)


def compact_tokens(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Stable partition of each row of ``keep`` (B, T) bool: kept positions in increasing order, then skipped.

    Returns ``index`` (B, T) int64 and ``count`` (B,) int64; ``index[b, :count[b]]`` are the kept positions.
    Gather the kept tokens with ``h.gather(1, index[:, :K, None].expand(-1, -1, D))``. No host sync.
    """
    if keep.is_cuda:
        return compact_tokens_triton(keep)
    return compact_tokens_reference(keep)


@torch.library.custom_op("condify::scatter_tokens", mutates_args=())
def _scatter_tokens_op(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None
) -> Tensor:
    check_scatter_tokens_args(base, update, index, count, scale)
    _require_kernel_device(base, "scatter_tokens")
    from .triton.tokens import scatter_tokens_launch

    return scatter_tokens_launch(base, update, index, count, scale)


@_scatter_tokens_op.register_fake
def _(base, update, index, count, scale):
    return torch.empty_like(base)


def _scatter_tokens_setup_context(ctx, inputs, output) -> None:
    base, update, index, count, scale = inputs
    ctx.save_for_backward(update, index, count, scale)


def _scatter_tokens_backward(ctx, grad: Tensor):
    update, index, count, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    K = update.shape[1]
    valid = (torch.arange(K, device=grad.device) < count[:, None])[..., None]  # (B, K, 1)
    idx = torch.where(valid[..., 0], index, 0)[..., None].expand_as(update)
    f = torch.promote_types(grad.dtype, torch.float32)
    rows = grad.gather(1, idx).to(f)  # grad of the output at each compacted row
    d_update = d_scale = None
    if need[1]:
        d_update = rows if scale is None else rows * scale.to(f)[..., None]
        d_update = torch.where(valid, d_update, 0).to(update.dtype)
    if scale is not None and need[4]:
        d_scale = torch.where(valid[..., 0], (rows * update.to(f)).sum(-1), 0).to(scale.dtype)
    return grad if need[0] else None, d_update, None, None, d_scale


_scatter_tokens_op.register_autograd(_scatter_tokens_backward, setup_context=_scatter_tokens_setup_context)


def scatter_tokens_triton(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None = None
) -> Tensor:
    """Triton path of ``scatter_tokens`` (CUDA tensors only); differentiable in base, update and scale."""
    check_scatter_tokens_args(base, update, index, count, scale)
    _require_cuda(base, "scatter_tokens_triton")
    return torch.ops.condify.scatter_tokens(base, update, index, count, scale)


def scatter_tokens(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None = None
) -> Tensor:
    """New tensor equal to ``base`` (B, T, D) with ``out[b, index[b, k]] += scale[b, k] * update[b, k]``
    for ``k < count[b]`` (``update`` (B, K, D), ``index`` (B, K) int64, ``count`` (B,) int64, ``scale``
    (B, K) or None). Rows ``k >= count[b]`` are ignored; the valid indices of a row must be distinct (as
    ``compact_tokens`` gives). Accumulates in fp32; output in ``base``'s dtype.
    """
    if base.is_cuda:
        return scatter_tokens_triton(base, update, index, count, scale)
    return scatter_tokens_reference(base, update, index, count, scale)
