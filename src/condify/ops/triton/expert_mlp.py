"""Triton kernel of the dynamic expert FFN (dynamic-k, lte).

One fused kernel, ``_expert_mlp_kernel``. A program owns (expert e, a chunk of e's neurons, a block of
tokens): it computes the chunk's hidden activations for the block from e's contiguous gate/up rows, applies
the activation, multiplies by the matching down-projection columns and atomically adds into a (T, d) fp32
output. Chunks of neurons are independent terms of the output sum, so no second pass is needed.

Two ways to form the token block, chosen on the host from the shape only (never from the data):

- ``GROUPED=False`` (decode / small batch): block = tokens [m*BM, (m+1)*BM); tokens that did not select e
  are masked; a block where nobody selected e exits at once, so unselected experts' weights are never read.
- ``GROUPED=True`` (batch / prefill): tokens sorted by expert on the device by a prefix sum of the mask
  (``group_tokens``, fixed size E*T, no host sync); block m of expert e = its tokens [m*BM, (m+1)*BM).
  The grid is the upper bound (E, chunks, cdiv(T, BM)); blocks past an expert's count exit at once.

No ``.item()``, no data-dependent shapes: the launch is graph-capturable.
Under ``TRITON_INTERPRET=1`` the kernel accepts CPU tensors (the interpreter runs on numpy) and loads are
upcast to fp32 (the interpreter's bf16 arithmetic is wrong); on CUDA bf16/fp16 go straight to ``tl.dot``
with fp32 accumulation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=1)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages)
        (16, 16, 256, 64, 4, 3),
        (16, 32, 128, 64, 4, 3),
        (16, 64, 64, 64, 4, 3),
        (16, 64, 128, 128, 4, 3),
        (16, 128, 64, 128, 8, 3),
        (32, 64, 64, 64, 4, 3),
        (64, 32, 64, 64, 4, 3),
        (64, 64, 64, 64, 4, 3),
        (64, 128, 64, 128, 8, 3),
        (128, 64, 64, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": d}, num_warps=w, num_stages=st)
        for m, n, k, d, w, st in shapes
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Neuron blocks no wider than the expert; token blocks of 16 for decode, no taller than the batch."""
    args = {**named_args, **kwargs}
    n_max = max(16, triton.next_power_of_2(args["S"]))
    m_max = max(16, triton.next_power_of_2(args["T"])) if args["GROUPED"] else 16
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_max and c.kwargs["BLOCK_M"] <= m_max]
    return kept or configs[:1]


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return z * tl.sigmoid(z)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh approximation); tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    else:  # relu
        return tl.maximum(z, 0.0)


@triton.autotune(
    configs=_configs(),
    key=["T_BUCKET", "D", "D_OUT", "I", "S", "GROUPED", "HAS_GATE"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["out_ptr"],
)
@triton.jit
def _expert_mlp_kernel(
    x_ptr,
    w_up_ptr,
    w_gate_ptr,
    b_up_ptr,
    b_gate_ptr,
    w_down_ptr,
    out_ptr,  # (T, D_OUT) fp32, zero-initialised
    mask_ptr,  # (T, E) bool, GROUPED=False
    tok_ptr,  # (E*T,) int32 tokens sorted expert-major, GROUPED=True
    off_ptr,  # (E,) int32 start of each expert's tokens in tok_ptr
    cnt_ptr,  # (E,) int32 number of tokens of each expert
    T,
    D,
    D_OUT,
    I,  # noqa: E741  (intermediate size, as in the papers)
    SD_OUT,  # w_down strides: (I, 1) in nn.Linear layout, (1, D_OUT) column-major
    SD_I,
    E,
    T_BUCKET,  # autotune key only
    S: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_B_UP: tl.constexpr,
    HAS_B_GATE: tl.constexpr,
    GROUPED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    if GROUPED:
        cnt = tl.load(cnt_ptr + e)
        row = pid_m * BLOCK_M + rm
        valid = row < cnt
        tok = tl.load(tok_ptr + tl.load(off_ptr + e) + row, mask=valid, other=0)
        active = pid_m * BLOCK_M < cnt
    else:
        tok = pid_m * BLOCK_M + rm
        in_range = tok < T
        valid = (tl.load(mask_ptr + tok * E + e, mask=in_range, other=0) != 0) & in_range
        active = tl.max(valid.to(tl.int32), axis=0) > 0
    if active:
        tok64 = tok.to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < S
        neuron = (e * S + rn).to(tl.int64)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < D
            xt = tl.load(
                x_ptr + tok64[:, None] * D + rk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0
            )
            w_mask = k_ok[:, None] & n_ok[None, :]
            wu = tl.load(w_up_ptr + neuron[None, :] * D + rk[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wu = wu.to(tl.float32)
            acc_up = tl.dot(xt, wu, acc_up, input_precision=PRECISION)
            if HAS_GATE:
                wg = tl.load(w_gate_ptr + neuron[None, :] * D + rk[:, None], mask=w_mask, other=0.0)
                if UPCAST:
                    wg = wg.to(tl.float32)
                acc_gate = tl.dot(xt, wg, acc_gate, input_precision=PRECISION)
        if HAS_B_UP:
            acc_up += tl.load(b_up_ptr + neuron, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            if HAS_B_GATE:
                acc_gate += tl.load(b_gate_ptr + neuron, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            h = _activation(acc_gate, ACT) * acc_up
        else:
            h = _activation(acc_up, ACT)
        h = tl.where(valid[:, None] & n_ok[None, :], h, 0.0)
        if not UPCAST:
            h = h.to(w_down_ptr.dtype.element_ty)
        for d0 in range(0, D_OUT, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D_OUT
            wd = tl.load(
                w_down_ptr + rd[None, :] * SD_OUT + neuron[:, None] * SD_I,
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                wd = wd.to(tl.float32)
            y = tl.dot(h, wd, input_precision=PRECISION)
            tl.atomic_add(
                out_ptr + tok64[:, None] * D_OUT + rd[None, :],
                y,
                mask=valid[:, None] & d_ok[None, :],
                sem="relaxed",
            )


def group_tokens(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens sorted by expert on the device: (tok (E*T,) int32, off (E,) int32, cnt (E,) int32).

    ``tok[off[e] : off[e] + cnt[e]]`` are the tokens that selected expert e, in increasing order. Prefix sum
    over the expert-major flattened mask; fixed-size output, no host sync.
    """
    T, E = mask.shape
    flat = mask.t().reshape(-1)  # (E*T,) expert-major
    pos = torch.cumsum(flat, 0, dtype=torch.int32) - 1
    dump = torch.full_like(pos, E * T)  # unselected pairs all land in one extra slot
    tok_ids = torch.arange(T, device=mask.device, dtype=torch.int32).repeat(E)
    tok = torch.zeros(E * T + 1, device=mask.device, dtype=torch.int32)
    tok.scatter_(0, torch.where(flat, pos, dump).long(), tok_ids)
    cnt = mask.sum(0, dtype=torch.int32)
    off = torch.cumsum(cnt, 0, dtype=torch.int32) - cnt
    return tok, off, cnt


# batches above this many tokens are grouped by expert (sort by prefix sum); below, one token block per expert
GROUPED_MIN_TOKENS = 32


def expert_mlp_launch(
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
    grouped: bool | None = None,
) -> Tensor:
    """Launch ``_expert_mlp_kernel`` (arguments already validated). Works on CUDA, or on CPU when interpreted."""
    T, D = x.shape
    inter = w_up.shape[0]
    E = inter // expert_size
    out = torch.zeros(T, w_down.shape[0], device=x.device, dtype=torch.float32)
    if T == 0:
        return out.to(x.dtype)
    grouped = T > GROUPED_MIN_TOKENS if grouped is None else grouped
    mask = mask.contiguous()
    if grouped:
        tok, off, cnt = group_tokens(mask)
    else:
        tok = off = cnt = mask  # unused

    def grid(meta: dict) -> tuple[int, int, int]:
        return (E, triton.cdiv(expert_size, meta["BLOCK_N"]), triton.cdiv(T, meta["BLOCK_M"]))

    fp32 = x.dtype == torch.float32
    _expert_mlp_kernel[grid](
        x.contiguous(),
        w_up,
        w_gate if w_gate is not None else w_up,
        b_up if b_up is not None else w_up,
        b_gate if b_gate is not None else w_up,
        w_down,
        out,
        mask.view(torch.uint8),
        tok,
        off,
        cnt,
        T,
        D,
        w_down.shape[0],
        inter,
        w_down.stride(0),
        w_down.stride(1),
        E,
        triton.next_power_of_2(T),
        S=expert_size,
        ACT=ACT_IDS[activation],
        HAS_GATE=w_gate is not None,
        HAS_B_UP=b_up is not None,
        HAS_B_GATE=b_gate is not None,
        GROUPED=grouped,
        UPCAST=INTERPRET or fp32,
        PRECISION="tf32" if (fp32 and torch.backends.cuda.matmul.allow_tf32) else "ieee",
    )
    return out.to(x.dtype)
