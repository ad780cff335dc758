"""Triton kernels of token compaction for per-token layer skipping (mod-threshold).

- ``_compact_tokens_kernel``: one program per sequence; two passes over the keep mask (count, then an
  exclusive prefix sum with ``tl.cumsum``) write the stable partition kept-then-skipped. No host sync.
- ``_scatter_tokens_kernel``: one program per (sequence, block of compacted rows, block of features); blocks
  past the sequence's count exit at once, so the grid is fixed by the shapes (graph-capturable).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _compact_tokens_kernel(keep_ptr, index_ptr, count_ptr, T, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = b * T
    acc = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(keep_ptr + row + t, mask=t < T, other=0).to(tl.int32)
    total = tl.sum(acc, axis=0)
    before = total * 0  # kept positions seen so far (scalar int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        k = tl.load(keep_ptr + row + t, mask=ok, other=0).to(tl.int32)
        kept_before = before + tl.cumsum(k, axis=0) - k
        pos = tl.where(k != 0, kept_before, total + t - kept_before)
        tl.store(index_ptr + row + pos, t.to(tl.int64), mask=ok)
        before += tl.sum(k, axis=0)
    tl.store(count_ptr + b, total.to(tl.int64))


def compact_tokens_launch(keep: Tensor) -> tuple[Tensor, Tensor]:
    B, T = keep.shape
    index = torch.empty(B, T, device=keep.device, dtype=torch.int64)
    count = torch.empty(B, device=keep.device, dtype=torch.int64)
    if B and T:
        block = min(triton.next_power_of_2(T), 1024)
        _compact_tokens_kernel[(B,)](keep.contiguous().view(torch.uint8), index, count, T, BLOCK_T=block)
    else:
        count.zero_()
    return index, count


@triton.jit
def _scatter_tokens_kernel(
    base_ptr,
    upd_ptr,
    index_ptr,
    count_ptr,
    scale_ptr,
    out_ptr,
    T,
    K,
    D,
    HAS_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    pid_d = tl.program_id(2)
    cnt = tl.minimum(tl.load(count_ptr + b), K)
    if pid_k * BLOCK_K < cnt:
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < cnt
        rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m = k_ok[:, None] & (rd < D)[None, :]
        idx = tl.load(index_ptr + b * K + rk, mask=k_ok, other=0)
        u = tl.load(upd_ptr + (b * K + rk)[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            u *= tl.load(scale_ptr + b * K + rk, mask=k_ok, other=0.0).to(tl.float32)[:, None]
        dst = (b * T + idx)[:, None] * D + rd[None, :]
        v = tl.load(base_ptr + dst, mask=m, other=0.0).to(tl.float32) + u
        tl.store(out_ptr + dst, v.to(out_ptr.dtype.element_ty), mask=m)


def scatter_tokens_launch(
    base: Tensor, update: Tensor, index: Tensor, count: Tensor, scale: Tensor | None = None
) -> Tensor:
    B, T, D = base.shape
    K = update.shape[1]
    base, update, index = base.contiguous(), update.contiguous(), index.contiguous()
    out = base.clone()
    if B and K and D:
        block_k = 16
        block_d = min(triton.next_power_of_2(D), 128 if INTERPRET else 256)
        grid = (B, triton.cdiv(K, block_k), triton.cdiv(D, block_d))
        _scatter_tokens_kernel[grid](
            base,
            update,
            index,
            count.contiguous(),
            scale.contiguous() if scale is not None else update,
            out,
            T,
            K,
            D,
            HAS_SCALE=scale is not None,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
    return out
