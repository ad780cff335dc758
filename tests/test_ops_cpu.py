"""The CPU kernels of ``condify::expert_mlp`` and ``condify::sparse_ffn``: naive per-token loop -> torch
reference (``condify.ops.reference``) -> compiled kernel (``ops/csrc/sparse_ffn.cpp``) and its plain-torch
fallback (forced with ``CONDIFY_CPU_KERNEL=0``).

Skipped only when no C++ compiler is installed; where one is, the kernel must build and these must run.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import condify
from condify.ops import (
    ACTIVATIONS,
    cpu,
    expert_mlp,
    expert_mlp_reference,
    router_scores_reference,
    select_experts_reference,
    sparse_ffn,
    sparse_ffn_reference,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ext():
    """The compiled kernel; skip only if there is genuinely no compiler."""
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("no C++ compiler: the compiled CPU kernel cannot be built (plain-torch fallback only)")
    e = cpu.extension()
    assert e is not None, f"a compiler is present but the CPU kernel did not build: {cpu._ext_error}"
    return e


@pytest.fixture
def compiled(ext, monkeypatch):
    monkeypatch.setenv("CONDIFY_CPU_KERNEL", "1")
    return ext


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setenv("CONDIFY_CPU_KERNEL", "0")


def loop_oracle(x, w_up, w_down, mask, expert_size, activation, w_gate=None, b_up=None, b_gate=None):
    """One token, one expert at a time, in float64: the definition of the op."""
    act = ACTIVATIONS[activation]
    x, w_up, w_down = x.double(), w_up.double(), w_down.double()
    w_gate = None if w_gate is None else w_gate.double()
    out = torch.zeros(x.shape[0], w_down.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in range(mask.shape[1]):
            if mask[t, e]:
                blk = slice(e * expert_size, (e + 1) * expert_size)
                u = w_up[blk] @ x[t] + (0 if b_up is None else b_up[blk].double())
                if w_gate is None:
                    h = act(u)
                else:
                    h = act(w_gate[blk] @ x[t] + (0 if b_gate is None else b_gate[blk].double())) * u
                out[t] += w_down[:, blk] @ h
    return out


def make(
    T=3, d=37, E=5, s=7, glu=True, bias=True, dtype=torch.float32, p=0.5, d_out=None, colmajor=True, seed=0
):
    g = torch.Generator().manual_seed(seed)
    inter = E * s

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    w_down = r(d_out or d, inter, scale=(inter * p) ** -0.5)
    return dict(
        x=r(T, d),
        w_up=r(inter, d, scale=d**-0.5),
        w_down=w_down.t().contiguous().t() if colmajor else w_down,
        mask=torch.rand(T, E, generator=g) < p,
        expert_size=s,
        w_gate=r(inter, d, scale=d**-0.5) if glu else None,
        b_up=r(inter, scale=0.5) if bias else None,
        b_gate=r(inter, scale=0.5) if bias and glu else None,
    )


def call(fn, a, activation):
    return fn(
        a["x"],
        a["w_up"],
        a["w_down"],
        a["mask"],
        a["expert_size"],
        activation,
        a["w_gate"],
        a["b_up"],
        a["b_gate"],
    )


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1.0)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------------------
# expert_mlp: loop -> reference -> compiled kernel
# ---------------------------------------------------------------------------------------------------------

SHAPES = [  # (T, d, E, s, d_out): odd widths (scalar tails), exact 16-wide vectors, tails after vectors
    (1, 37, 5, 7, None),
    (1, 64, 6, 8, None),
    (3, 40, 4, 5, 24),
    (5, 48, 9, 4, None),
    (9, 37, 5, 7, 70),
    (32, 33, 3, 16, None),
]


@pytest.mark.parametrize(("T", "d", "E", "s", "d_out"), SHAPES)
@pytest.mark.parametrize(
    ("glu", "bias", "activation"),
    [(True, True, "silu"), (True, False, "gelu"), (False, True, "gelu_tanh"), (False, False, "relu")],
)
@pytest.mark.parametrize("colmajor", [True, False])
def test_kernel_matches_loop_and_reference(compiled, T, d, E, s, d_out, glu, bias, activation, colmajor):
    a = make(T=T, d=d, E=E, s=s, glu=glu, bias=bias, d_out=d_out, colmajor=colmajor)
    ref = loop_oracle(**a, activation=activation)
    assert_close(call(expert_mlp_reference, a, activation), ref, torch.float32)
    assert_close(call(expert_mlp, a, activation), ref, torch.float32)
    assert_close(call(torch.ops.condify.expert_mlp, a, activation), ref, torch.float32)


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("colmajor", [True, False])
def test_kernel_bf16_against_fp32_of_rounded_weights(compiled, T, glu, colmajor):
    """bf16 weights, fp32 accumulation: compare with the loop over the same (bf16-rounded) values."""
    a = make(T=T, d=48, E=6, s=8, glu=glu, dtype=torch.bfloat16, colmajor=colmajor)
    ref = loop_oracle(**a, activation="silu")  # the loop upcasts the bf16 values exactly
    out = call(expert_mlp, a, "silu")
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-2 * max(1.0, ref.abs().max().item())  # the output's own bf16 rounding


def test_tau0_is_the_dense_mlp_bitwise(compiled):
    """All experts selected (a converted model at tau = 0) runs exactly the dense MLP's torch ops."""
    a = make(T=3, d=64, E=8, s=8, colmajor=False)
    every = {**a, "mask": torch.ones_like(a["mask"])}
    x, wg, wu, wd = a["x"], a["w_gate"], a["w_up"], a["w_down"]
    dense = F.linear(F.silu(F.linear(x, wg, a["b_gate"])) * F.linear(x, wu, a["b_up"]), wd)
    assert torch.equal(call(expert_mlp, every, "silu"), dense)


@pytest.mark.parametrize("T", [1, 4])
def test_kernel_zero_and_all_experts(compiled, T):
    a = make(T=T)
    none = {**a, "mask": torch.zeros_like(a["mask"])}
    assert torch.equal(call(expert_mlp, none, "silu"), torch.zeros(T, 37))
    every = {**a, "mask": torch.ones_like(a["mask"])}
    x, wg, wu, wd = a["x"], a["w_gate"], a["w_up"], a["w_down"]
    dense = F.linear(F.silu(F.linear(x, wg, a["b_gate"])) * F.linear(x, wu, a["b_up"]), wd)
    torch.testing.assert_close(call(expert_mlp, every, "silu"), dense, rtol=1e-5, atol=1e-5)
    # everything selected goes to the dense torch MLP (bitwise the dense order); the kernel itself too:
    args = (a["x"], wu, wd, every["mask"], 7, cpu.ACT_IDS["silu"], wg, a["b_up"], a["b_gate"])
    torch.testing.assert_close(compiled.expert_mlp(*args), dense, rtol=1e-5, atol=1e-5)
    mixed = {**a, "mask": torch.zeros_like(a["mask"])}
    mixed["mask"][0] = True  # token 0 everything, the others nothing
    out = call(expert_mlp, mixed, "silu")
    torch.testing.assert_close(out[0], dense[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))


def test_kernel_non_contiguous_inputs(compiled):
    a = make(T=4, d=40, E=4, s=6)
    wide = torch.randn(4, 80)
    x = wide[:, ::2]  # strided activations
    fused_b = torch.randn(2 * 24)
    b_gate, b_up = fused_b[:24], fused_b[24:]  # slices of a fused gate_up bias
    mask = torch.rand(4, 4).t().contiguous().t() < 0.6  # column-major mask
    b = {**a, "x": x, "mask": mask, "b_up": b_up, "b_gate": b_gate}
    assert not x.is_contiguous() and not mask.is_contiguous()
    ref = loop_oracle(**b, activation="silu")
    assert_close(call(expert_mlp, b, "silu"), ref, torch.float32)


def test_kernel_threads_agree(compiled):
    """Per-thread accumulators, reduced at the end: two threads give the one-thread result."""
    a = make(T=3, d=64, E=16, s=8, p=0.6)
    one = call(expert_mlp, a, "silu")
    torch.set_num_threads(2)
    try:
        two = call(expert_mlp, a, "silu")
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-6)


def test_large_batches_take_the_torch_strategies(compiled, monkeypatch):
    """Many tokens x a dense selection (200 x 0.5 > 64 per expert): the op runs the MKL strategies."""
    a = make(T=200)
    calls = []
    monkeypatch.setattr(cpu, "expert_mlp_torch", lambda *args: calls.append(1) or expert_mlp_reference(*args))
    assert_close(call(expert_mlp, a, "silu"), loop_oracle(**a, activation="silu"), torch.float32)
    assert calls == [1]


def test_fallback_forced_matches(fallback, monkeypatch):
    monkeypatch.setattr(cpu, "_build", lambda: (_ for _ in ()).throw(AssertionError("must not build")))
    for T in (1, 5):
        a = make(T=T)
        assert_close(call(expert_mlp, a, "gelu"), loop_oracle(**a, activation="gelu"), torch.float32)


def test_a_killed_build_lock_is_cleared_but_a_fresh_one_is_left(monkeypatch, tmp_path):
    """torch's builder waits forever on the ``lock`` a killed build leaves; a fresh lock is a build running."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("condify_test_ext", False)) / "lock"
    lock.touch()
    assert not cpu.clear_stale_lock("condify_test_ext") and lock.exists()  # a build may be running
    old = time.time() - 2 * cpu.STALE_LOCK_S
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        assert cpu.clear_stale_lock("condify_test_ext")
    assert not lock.exists() and not cpu.clear_stale_lock("condify_test_ext")  # no lock: nothing to do


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("CONDIFY_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_ext_error", None)
    monkeypatch.setattr(cpu, "_warned", False)

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions (simulated)")

    monkeypatch.setattr(cpu, "_build", no_compiler)
    a = make(T=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = call(expert_mlp, a, "silu")
    msgs = [str(w.message) for w in caught if "compiled CPU kernel" in str(w.message)]
    assert len(msgs) == 1 and "pip install ninja" in msgs[0]
    assert_close(out, loop_oracle(**a, activation="silu"), torch.float32)
    monkeypatch.setenv("CONDIFY_CPU_KERNEL", "1")
    with pytest.raises(RuntimeError, match="could not be built"):
        call(expert_mlp, a, "silu")


@pytest.mark.parametrize("mode", ["compiled", "fallback"])
def test_autograd_after_compiled_forward(mode, request):
    """register_autograd's torch backward is right whichever CPU kernel ran the forward."""
    request.getfixturevalue(mode)
    a = make(T=3, d=24, E=4, s=8, dtype=torch.float32)
    a = {
        k: v.requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in a.items()
    }
    leaves = [v for v in a.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.randn(3, 24)
    got = torch.autograd.grad((call(expert_mlp, a, "silu") * g).sum(), leaves)
    want = torch.autograd.grad((call(expert_mlp_reference, a, "silu") * g).sum(), leaves)
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["compiled", "fallback"])
def test_opcheck(mode, request):
    request.getfixturevalue(mode)
    a = make(T=2, d=16, E=4, s=8)
    args = (a["x"], a["w_up"], a["w_down"], a["mask"], 8, "silu", a["w_gate"], a["b_up"], a["b_gate"])
    torch.library.opcheck(torch.ops.condify.expert_mlp.default, args)
    r = router(16, 4, width=6)
    sargs = (
        a["x"],
        *r,
        "tau_max",
        0.5,
        a["w_up"],
        a["w_down"],
        8,
        "silu",
        a["w_gate"],
        a["b_up"],
        a["b_gate"],
    )
    torch.library.opcheck(
        torch.ops.condify.sparse_ffn.default, sargs, test_utils=("test_schema", "test_faketensor")
    )


# ---------------------------------------------------------------------------------------------------------
# sparse_ffn: router + selection + experts, both selection rules
# ---------------------------------------------------------------------------------------------------------


def router(d, E, width=None, dtype=torch.float32, seed=1):
    """(w1, b1, w2, b2): dynamic-k's Linear -> ReLU -> Linear -> abs with a width, lte's one Linear without."""
    g = torch.Generator().manual_seed(seed)
    if width is None:
        return (torch.randn(E, d, generator=g).to(dtype), torch.randn(E, generator=g).to(dtype), None, None)
    return (
        (torch.randn(width, d, generator=g) / d**0.5).to(dtype),
        torch.randn(width, generator=g).to(dtype),
        (torch.randn(E, width, generator=g) / width**0.5).to(dtype),
        torch.randn(E, generator=g).to(dtype),
    )


def naive_select(scores, rule, threshold):
    """Per token, per expert, in float64."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for t in range(scores.shape[0]):
        row = scores[t].double()
        for e in range(scores.shape[1]):
            if rule == "sigmoid":
                mask[t, e] = 1 / (1 + torch.exp(-row[e])) >= threshold
            else:
                mask[t, e] = row[e] >= threshold * row.max()
        if rule == "tau_max":
            mask[t, int(row.argmax())] = True
    return mask


RULES = [
    ("tau_max", 0.0, 13),
    ("tau_max", 0.6, 13),
    ("tau_max", 1.0, 13),
    ("sigmoid", 0.5, None),
    ("sigmoid", 0.9, None),
    ("sigmoid", 0.0, None),
]


@pytest.mark.parametrize(("rule", "threshold", "width"), RULES)
@pytest.mark.parametrize("T", [1, 3, 10])
@pytest.mark.parametrize("glu", [True, False])
def test_sparse_ffn_matches_loop(compiled, rule, threshold, width, T, glu):
    a = make(T=T, d=37, E=5, s=7, glu=glu)
    r = router(37, 5, width)
    scores = router_scores_reference(a["x"], *r)
    want_mask = naive_select(scores, rule, threshold)
    assert torch.equal(select_experts_reference(scores, rule, threshold), want_mask)
    args = (
        a["x"],
        *r,
        rule,
        threshold,
        a["w_up"],
        a["w_down"],
        7,
        "silu",
        a["w_gate"],
        a["b_up"],
        a["b_gate"],
    )
    ref_out, ref_mask = sparse_ffn_reference(*args)
    assert torch.equal(ref_mask, want_mask)
    want = loop_oracle(**{**a, "mask": want_mask}, activation="silu")
    assert_close(ref_out, want, torch.float32)
    for fn in (sparse_ffn, torch.ops.condify.sparse_ffn):
        out, mask = fn(*args)
        assert torch.equal(mask, want_mask), (rule, threshold)
        assert_close(out, want, torch.float32)


@pytest.mark.parametrize(("rule", "threshold", "width"), [("tau_max", 0.5, 16), ("sigmoid", 0.5, None)])
@pytest.mark.parametrize("T", [1, 5])
def test_sparse_ffn_bf16(compiled, rule, threshold, width, T):
    """bf16 router and experts: scores in fp32 from the bf16 values, fp32 accumulation."""
    a = make(T=T, d=48, E=6, s=8, dtype=torch.bfloat16)
    r = router(48, 6, width, dtype=torch.bfloat16)
    args = (
        a["x"],
        *r,
        rule,
        threshold,
        a["w_up"],
        a["w_down"],
        8,
        "silu",
        a["w_gate"],
        a["b_up"],
        a["b_gate"],
    )
    out, mask = sparse_ffn(*args)
    ref_out, ref_mask = sparse_ffn_reference(*args)
    assert torch.equal(mask, ref_mask)
    want = loop_oracle(**{**a, "mask": ref_mask}, activation="silu")
    err = (out.double() - want).abs().max().item()
    assert out.dtype == torch.bfloat16 and err <= 1e-2 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize(("rule", "width"), [("tau_max", 13), ("sigmoid", None)])
def test_sparse_ffn_fallback_forced(fallback, rule, width):
    a = make(T=2)
    r = router(37, 5, width)
    args = (a["x"], *r, rule, 0.5, a["w_up"], a["w_down"], 7, "gelu", a["w_gate"], a["b_up"], a["b_gate"])
    out, mask = sparse_ffn(*args)
    ref_out, ref_mask = sparse_ffn_reference(*args)
    assert torch.equal(mask, ref_mask)
    assert_close(out, ref_out, torch.float32)


def test_flops_counted_for_both_ops(compiled):
    from torch.utils.flop_counter import FlopCounterMode

    from condify.ops._dispatch import register_flop_formulas

    register_flop_formulas()
    a = make(T=3, d=37, E=5, s=7, d_out=20)
    r = router(37, 5, 13)
    with FlopCounterMode(display=False) as counter:
        out, mask = sparse_ffn(a["x"], *r, "tau_max", 0.5, a["w_up"], a["w_down"], 7, "silu", a["w_gate"])
    neurons = int(mask.sum()) * 7
    router_flops = 2 * 3 * (37 * 13 + 13 * 5)
    assert counter.get_total_flops() == router_flops + 2 * neurons * (2 * 37 + 20)
    with FlopCounterMode(display=False) as counter:
        call(expert_mlp, a, "silu")
    assert counter.get_total_flops() == 2 * int(a["mask"].sum()) * 7 * (2 * 37 + 20)


# ---------------------------------------------------------------------------------------------------------
# dynamic-k through the kernels
# ---------------------------------------------------------------------------------------------------------


def test_dynamic_k_decode_uses_fused_kernel_and_matches_masked(compiled, monkeypatch):
    from tiny import tiny

    from condify.methods.dynamic_k import mode, track_executed
    from condify.methods.dynamic_k.modules import converted

    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8, tau=0.5)
    ids = torch.randint(0, 128, (2, 7))
    calls = []
    real = cpu.sparse_ffn_cpu
    monkeypatch.setattr(cpu, "sparse_ffn_cpu", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    with torch.no_grad(), track_executed(model) as stats:
        sparse = model(ids).logits
    assert len(calls) == len(converted(model, "mlp")) and all(n == 14 for n in calls)
    assert 0 < stats.fraction("dynamic-k") < 1
    with torch.no_grad(), mode(model, "masked"):
        masked = model(ids).logits
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # batch-1 cached decode through the fused op equals the masked forward
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        with mode(model, "masked"):
            ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_compile_converted_model_without_graph_breaks(compiled):
    """torch.compile traces the whole converted tiny llama (expert layers are custom ops: no breaks)."""
    from tiny import tiny

    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8, tau=0.5)
    ids = torch.randint(0, 128, (2, 6))
    torch._dynamo.reset()  # fullgraph=True: any graph break (e.g. in an expert layer) is an error
    eager = model(ids, use_cache=False).logits
    compiled_fn = torch.compile(
        lambda i: model(i, use_cache=False).logits, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled_fn(ids), eager, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled_fn(ids), eager, rtol=1e-4, atol=1e-5)
