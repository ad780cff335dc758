"""compact_tokens / scatter_tokens: naive loop (oracle) -> torch reference -> Triton (interpreter / CUDA)."""

from __future__ import annotations

import os

import pytest
import torch

from condify.ops import (
    compact_tokens,
    compact_tokens_reference,
    compact_tokens_triton,
    scatter_tokens,
    scatter_tokens_reference,
    scatter_tokens_triton,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def compact_oracle(keep):
    index, count = [], []
    for row in keep.tolist():
        kept = [t for t, k in enumerate(row) if k]
        index.append(kept + [t for t, k in enumerate(row) if not k])
        count.append(len(kept))
    return torch.tensor(index, dtype=torch.int64).reshape(keep.shape), torch.tensor(count, dtype=torch.int64)


def scatter_oracle(base, update, index, count, scale=None):
    out = base.double().clone()
    for b in range(base.shape[0]):
        for k in range(int(count[b])):
            s = 1.0 if scale is None else float(scale[b, k])
            out[b, index[b, k]] += s * update[b, k].double()
    return out


def keeps(B, T, p=0.5):
    keep = torch.rand(B, T) < p
    keep[0] = True  # all kept
    if B > 1:
        keep[1] = False  # none kept
    return keep


@pytest.mark.parametrize(("B", "T"), [(1, 1), (3, 37), (4, 1100)])
def test_compact_reference_matches_loop(B, T):
    keep = keeps(B, T)
    index, count = compact_tokens_reference(keep)
    want_index, want_count = compact_oracle(keep)
    assert torch.equal(index, want_index) and torch.equal(count, want_count)
    assert torch.equal(compact_tokens(keep)[0], index)  # CPU dispatch = reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_scatter_reference_matches_loop(dtype, with_scale):
    B, T, D = 3, 37, 72
    keep = keeps(B, T)
    index, count = compact_tokens_reference(keep)
    K = 20  # fewer compacted rows than some counts: rows past K are simply absent
    count = count.clamp(max=K)
    base, update = torch.randn(B, T, D).to(dtype), torch.randn(B, K, D).to(dtype)
    scale = torch.rand(B, K).to(dtype) if with_scale else None
    out = scatter_tokens_reference(base, update, index[:, :K].contiguous(), count, scale)
    want = scatter_oracle(base, update, index, count, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_scatter_ignores_rows_past_count():
    base, update = torch.zeros(1, 4, 2), torch.ones(1, 3, 2)
    index = torch.tensor([[2, 0, 99]])  # garbage past count
    out = scatter_tokens(base, update, index, torch.tensor([2]))
    assert out[0, :, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_scatter_reference_gradients_match_loop():
    B, T, D, K = 2, 9, 5, 6
    keep = keeps(B, T)
    index, count = compact_tokens_reference(keep)
    count = count.clamp(max=K)
    index = index[:, :K].contiguous()
    base = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    update = torch.randn(B, K, D, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(B, K, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda b, u, s: scatter_tokens_reference(b, u, index, count, s), (base, update, scale)
    )


def test_mod_roundtrip_gather_then_scatter():
    """Gather kept tokens with the compaction index, update them, scatter back == masked update."""
    B, T, D = 3, 11, 8
    keep = keeps(B, T)
    h, g = torch.randn(B, T, D), torch.rand(B, T)
    index, count = compact_tokens(keep)
    K = int(count.max())
    idx = index[:, :K]
    kept = h.gather(1, idx[..., None].expand(-1, -1, D))
    out = scatter_tokens(h, torch.tanh(kept), idx, count, g.gather(1, idx))
    want = h + torch.where(keep[..., None], g[..., None] * torch.tanh(h), 0)
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------------------------------------
# Triton under the interpreter (custom ops accept CPU tensors when TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize(("B", "T"), [(1, 1), (3, 37), (2, 1100)])  # 1100 > BLOCK_T: two chunks
def test_compact_kernel(B, T):
    keep = keeps(B, T)
    index, count = torch.ops.condify.compact_tokens(keep)
    want_index, want_count = compact_oracle(keep)
    assert torch.equal(index, want_index) and torch.equal(count, want_count)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_scatter_kernel(dtype, with_scale):
    B, T, D, K = 3, 37, 72, 30
    keep = keeps(B, T)
    index, count = compact_tokens_reference(keep)
    base, update = torch.randn(B, T, D).to(dtype), torch.randn(B, K, D).to(dtype)
    scale = torch.rand(B, K).to(dtype) if with_scale else None
    index = index[:, :K].contiguous()
    out = torch.ops.condify.scatter_tokens(base, update, index, count, scale)
    want = scatter_tokens_reference(base, update, index, count, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype] * 4)


@needs_interpreter
def test_scatter_custom_op_backward_and_opcheck():
    B, T, D, K = 2, 9, 5, 6
    index, count = compact_tokens_reference(keeps(B, T))
    count, index = count.clamp(max=K), index[:, :K].contiguous()
    base = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    update = torch.randn(B, K, D, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(B, K, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, T, D, dtype=torch.float64)
    got = torch.autograd.grad(
        (torch.ops.condify.scatter_tokens(base, update, index, count, scale) * g).sum(), (base, update, scale)
    )
    want = torch.autograd.grad(
        (scatter_tokens_reference(base, update, index, count, scale) * g).sum(), (base, update, scale)
    )
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w)
    torch.library.opcheck(
        torch.ops.condify.scatter_tokens.default, (base.float(), update.float(), index, count, None)
    )
    torch.library.opcheck(torch.ops.condify.compact_tokens.default, (keeps(B, T),))


@needs_interpreter
def test_compile_traces_token_ops():
    keep, h = keeps(2, 7), torch.randn(2, 7, 4)

    def f(keep, h):
        index, count = torch.ops.condify.compact_tokens(keep)
        return torch.ops.condify.scatter_tokens(
            h, h.gather(1, index[..., None].expand(-1, -1, 4)), index, count, None
        )

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(keep, h)
    torch.testing.assert_close(out, h + torch.where(keep[..., None], h, 0))


# ---------------------------------------------------------------------------------------------------------
# bad input; CUDA
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs():
    with pytest.raises(ValueError, match="bool"):
        compact_tokens(torch.ones(2, 3))
    with pytest.raises(ValueError, match="CUDA"):
        compact_tokens_triton(torch.ones(2, 3, dtype=torch.bool))
    base, update = torch.zeros(2, 5, 4), torch.zeros(2, 3, 4)
    index, count = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="index"):
        scatter_tokens(base, update, index.int(), count)
    with pytest.raises(ValueError, match="update"):
        scatter_tokens(base, update[:, :, :2], index, count)
    with pytest.raises(TypeError, match="dtype"):
        scatter_tokens(base, update.double(), index, count)
    with pytest.raises(ValueError, match="CUDA"):
        scatter_tokens_triton(base, update, index, count)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_token_ops(dtype):
    B, T, D = 4, 2049, 576
    keep = keeps(B, T).cuda()
    index, count = compact_tokens(keep)
    want_index, want_count = compact_oracle(keep.cpu())
    assert torch.equal(index.cpu(), want_index) and torch.equal(count.cpu(), want_count)
    base, update = (
        torch.randn(B, T, D, device="cuda", dtype=dtype),
        torch.randn(B, T, D, device="cuda", dtype=dtype),
    )
    scale = torch.rand(B, T, device="cuda", dtype=dtype)
    out = scatter_tokens(base, update, index, count, scale)
    torch.testing.assert_close(
        out, scatter_tokens_reference(base, update, index, count, scale), rtol=TOL[dtype], atol=TOL[dtype] * 4
    )
