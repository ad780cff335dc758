"""expert_mlp: naive per-token loop (oracle) -> torch reference and the plain-torch CPU strategies
(``expert_mlp_torch``) -> Triton (interpreter on CPU, CUDA on a GPU). The compiled CPU kernel: test_ops_cpu.py.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), which takes CPU
tensors; ``expert_mlp_triton`` refuses CPU tensors by design, and the custom op ``torch.ops.condify.expert_mlp``
runs its registered CPU kernel on CPU tensors, so these tests call the Triton launcher directly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from condify.ops import ACTIVATIONS, expert_mlp, expert_mlp_reference, expert_mlp_torch, expert_mlp_triton
from condify.ops import cpu as cpu_module

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread (two threads on a busy 2-core machine can stall for seconds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def loop_oracle(x, w_up, w_down, mask, expert_size, activation, w_gate=None, b_up=None, b_gate=None):
    """One token, one expert at a time: the definition of the op (differentiable, no in-place)."""
    act = ACTIVATIONS[activation]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(w_down.shape[0], dtype=x.dtype)
        for e in range(mask.shape[1]):
            if not mask[t, e]:
                continue
            blk = slice(e * expert_size, (e + 1) * expert_size)
            u = w_up[blk] @ x[t] + (b_up[blk] if b_up is not None else 0)
            if w_gate is None:
                h = act(u)
            else:
                h = act(w_gate[blk] @ x[t] + (b_gate[blk] if b_gate is not None else 0)) * u
            acc = acc + w_down[:, blk] @ h
        rows.append(acc)
    return torch.stack(rows)


def make(
    T=3,
    d=72,
    inter=200,
    s=8,
    glu=True,
    bias=False,
    dtype=torch.float32,
    p=0.4,
    requires_grad=False,
    d_out=None,
):
    E = inter // s
    g = torch.Generator().manual_seed(T * 1000 + inter)

    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    x = r(T, d)
    w_up, w_down = r(inter, d, scale=d**-0.5), r(d_out or d, inter, scale=(inter * max(p, 0.1)) ** -0.5)
    w_gate = r(inter, d, scale=d**-0.5) if glu else None
    b_up = r(inter, scale=0.5) if bias else None
    b_gate = r(inter, scale=0.5) if bias and glu else None
    mask = torch.rand(T, E, generator=g) < p
    return dict(
        x=x, w_up=w_up, w_down=w_down, mask=mask, expert_size=s, w_gate=w_gate, b_up=b_up, b_gate=b_gate
    )


def call(fn, a, activation, **kw):
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
        **kw,
    )


def f64(a):
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in a.items()
    }


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1.0)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------------------
# tier 1 -> 2: reference vs the naive loop
# ---------------------------------------------------------------------------------------------------------


def strategy_kw(strategy, monkeypatch):
    """ "spans-exact": one span per run of selected experts, no gap bridged (at d=72 the default cost model
    bridges every gap, so plain "spans" computes one masked span)."""
    if strategy == "spans-exact":
        monkeypatch.setattr(cpu_module, "_CALL_COST", 0)
        return {"strategy": "spans"}
    return {"strategy": strategy}


STRATEGIES = ["auto", "dense", "spans", "spans-exact", "grouped"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize(
    ("glu", "bias", "activation"),
    [(True, True, "silu"), (True, False, "gelu"), (False, True, "gelu_tanh"), (False, False, "relu")],
)
def test_reference_matches_loop(strategy, T, glu, bias, activation, monkeypatch):
    a = make(T=T, glu=glu, bias=bias)
    ref = loop_oracle(**f64(a), activation=activation)
    assert_close(
        call(expert_mlp_torch, a, activation, **strategy_kw(strategy, monkeypatch)), ref, torch.float32
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("d_out", [40, 100])
def test_reference_output_width_differs(strategy, T, d_out, monkeypatch):
    """w_down (d_out, I) with d_out != d: an MLP replacing an attention projection (dynamic-k)."""
    a = make(T=T, glu=False, bias=True, d_out=d_out)
    ref = loop_oracle(**f64(a), activation="relu")
    assert_close(call(expert_mlp_torch, a, "relu", **strategy_kw(strategy, monkeypatch)), ref, torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_reference_zero_and_all_experts(strategy, p, monkeypatch):
    a = make(T=5, p=p, bias=True)
    out = call(expert_mlp_torch, a, "silu", **strategy_kw(strategy, monkeypatch))
    if p == 0.0:
        assert torch.equal(out, torch.zeros_like(out))
    else:  # all experts = the dense MLP
        x, wg, wu, wd = a["x"], a["w_gate"], a["w_up"], a["w_down"]
        dense = F.linear(F.silu(F.linear(x, wg, a["b_gate"])) * F.linear(x, wu, a["b_up"]), wd)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_reference_low_precision(dtype, strategy, monkeypatch):
    a = make(T=4, dtype=dtype, bias=True)
    ref = loop_oracle(**f64(a), activation="silu")
    assert_close(call(expert_mlp_torch, a, "silu", **strategy_kw(strategy, monkeypatch)), ref, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize(("glu", "activation"), [(True, "silu"), (False, "gelu")])
def test_reference_gradients_match_loop(strategy, glu, activation, monkeypatch):
    a = make(T=3, d=16, inter=48, glu=glu, bias=True, dtype=torch.float64, requires_grad=True)
    a["mask"][0, :2] = True  # a run of two experts
    leaves = [v for v in a.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.randn(3, 16, dtype=torch.float64)
    want = torch.autograd.grad((loop_oracle(**a, activation=activation) * g).sum(), leaves)
    got = torch.autograd.grad(
        (call(expert_mlp_torch, a, activation, **strategy_kw(strategy, monkeypatch)) * g).sum(), leaves
    )
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-9, atol=1e-9)


def test_spans_plan(monkeypatch):
    monkeypatch.setattr(cpu_module, "_CALL_COST", 32 * 3 * 576)  # one call ~ 32 neurons at d=576
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    # d=576, one token, 64-neuron experts: gaps cost more than a call -> one span per run
    assert cpu_module._spans(mask, 64, 576) == [(0, 2, False), (3, 4, False), (9, 10, False)]
    # 8-neuron experts: gaps of <= 4 experts are cheaper to compute than one more call -> bridged, masked
    assert cpu_module._spans(mask, 8, 576) == [(0, 4, True), (9, 10, False)]
    two = torch.cat([mask, torch.zeros_like(mask)])  # a second token selecting nothing: every span masked
    assert cpu_module._spans(two, 64, 576) == [(0, 2, True), (3, 4, True), (9, 10, True)]
    assert cpu_module._choose_strategy(mask, 64, 576)[0] == "spans"
    # all selected: one unmasked span over the whole layer (the dense MLP without masking)
    assert cpu_module._choose_strategy(torch.ones(1, 10, dtype=torch.bool), 64, 576) == (
        "spans",
        [(0, 10, False)],
    )
    # prefill, random half of 128-neuron experts per token: the union is everything -> grouped saves FLOPs
    prefill = torch.rand(512, 12).argsort(1) < 6
    assert cpu_module._choose_strategy(prefill, 128, 576)[0] == "grouped"
    assert cpu_module._choose_strategy(torch.rand(512, 192).argsort(1) < 96, 8, 576)[0] != "grouped"


def test_reference_reads_slices_not_copies(monkeypatch):
    """The CPU path must not gather weights with index_select / fancy indexing."""
    monkeypatch.setattr(cpu_module, "_CALL_COST", 0)
    a = make(T=1, p=0.5)

    def banned(*args, **kwargs):
        raise AssertionError("weights gathered with index_select")

    monkeypatch.setattr(torch, "index_select", banned)
    monkeypatch.setattr(torch.Tensor, "index_select", banned)
    call(expert_mlp_torch, a, "silu", strategy="spans")


def column_major(w):
    """The layout dynamic-k stores ``w_down`` in: same values, ``w.t()`` contiguous."""
    return w.t().contiguous().t()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("T", [1, 37])
def test_reference_column_major_down(strategy, T, monkeypatch):
    a = make(T=T, p=0.5, bias=True)
    ref = loop_oracle(**f64(a), activation="silu")
    b = {**a, "w_down": column_major(a["w_down"])}
    assert not b["w_down"].is_contiguous()
    assert_close(call(expert_mlp_torch, b, "silu", **strategy_kw(strategy, monkeypatch)), ref, torch.float32)


@pytest.mark.parametrize("call_cost", [None, 0])  # default: gaps bridged; 0: one call chain per run
@pytest.mark.parametrize(
    ("glu", "bias", "dtype"), [(True, True, torch.float32), (False, True, torch.bfloat16)]
)
def test_decode_path_matches_loop(call_cost, glu, bias, dtype, monkeypatch):
    from condify.ops import expert_mlp_decode

    if call_cost is not None:
        monkeypatch.setattr(cpu_module, "_CALL_COST", call_cost)
    a = make(T=1, glu=glu, bias=bias, dtype=dtype, p=0.5)
    for sel in (a["mask"][0], torch.zeros(25, dtype=torch.bool), torch.ones(25, dtype=torch.bool)):
        b = {**a, "mask": sel[None], "w_down": column_major(a["w_down"])}
        ref = loop_oracle(**f64(b), activation="silu")
        args = (b["x"], b["w_up"], b["w_down"], sel.tolist(), b["expert_size"], "silu")
        assert_close(expert_mlp_decode(*args, b["w_gate"], b["b_up"], b["b_gate"]), ref, dtype)


@pytest.mark.parametrize("force", ["0", None])
def test_dispatch_on_cpu_matches_reference(force, monkeypatch):
    """The op's CPU kernel (compiled, or plain torch when forced) computes the reference's function."""
    if force is not None:
        monkeypatch.setenv("CONDIFY_CPU_KERNEL", force)
    for T in (1, 3, 40):
        a = make(T=T, bias=True)
        assert_close(call(expert_mlp, a, "silu"), call(expert_mlp_reference, a, "silu"), torch.float32)


def test_torch_compile_fullgraph_cpu():
    """The CPU reference traces without graph breaks (compile-friendly dense branch)."""

    class ExpertFFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.gate = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
            self.down = torch.nn.Linear(32, 16)

        def forward(self, x, mask):
            y = expert_mlp(
                x,
                self.up.weight,
                self.down.weight,
                mask,
                8,
                "silu",
                self.gate.weight,
                self.up.bias,
                self.gate.bias,
            )
            return y + self.down.bias

    m = ExpertFFN()
    x, mask = torch.randn(5, 16), torch.rand(5, 4) < 0.5
    eager = m(x, mask)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), eager, rtol=1e-5, atol=1e-6)
    compiled(x, mask).sum().backward()  # autograd through the traced graph
    assert m.up.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------
# tier 2 -> 3: Triton (interpreter on CPU) vs reference
# ---------------------------------------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")

KERNEL_CASES = [  # (T, inter, s, glu, bias, activation, dtype, grouped)
    (1, 200, 8, True, True, "silu", torch.float32, False),
    (1, 200, 8, False, False, "gelu", torch.bfloat16, False),
    (3, 192, 24, True, False, "gelu_tanh", torch.float16, False),  # 24 neurons: two neuron blocks per expert
    (3, 200, 8, False, True, "relu", torch.float32, True),
    (37, 200, 8, True, True, "silu", torch.bfloat16, True),
    (37, 200, 8, True, False, "silu", torch.float32, False),
]


@needs_interpreter
@pytest.mark.parametrize(("T", "inter", "s", "glu", "bias", "activation", "dtype", "grouped"), KERNEL_CASES)
def test_kernel_matches_reference(T, inter, s, glu, bias, activation, dtype, grouped):
    from condify.ops.triton.expert_mlp import expert_mlp_launch

    a = make(T=T, inter=inter, s=s, glu=glu, bias=bias, dtype=dtype)
    ref = loop_oracle(**f64(a), activation=activation)
    assert_close(call(expert_mlp_launch, a, activation, grouped=grouped), ref, dtype)
    assert_close(call(expert_mlp_reference, a, activation), ref, dtype)


@needs_interpreter
@pytest.mark.parametrize(("T", "grouped"), [(1, False), (37, True)])
def test_kernel_output_width_differs(T, grouped):
    from condify.ops.triton.expert_mlp import expert_mlp_launch

    a = make(T=T, glu=False, bias=True, d_out=100)  # BLOCK_D=64: two output blocks, the last partial
    ref = loop_oracle(**f64(a), activation="relu")
    assert_close(call(expert_mlp_launch, a, "relu", grouped=grouped), ref, torch.float32)
    out = call(torch.ops.condify.expert_mlp, a, "relu")
    assert out.shape == (T, 100)


@needs_interpreter
@pytest.mark.parametrize(("T", "grouped", "dtype"), [(1, False, torch.float32), (37, True, torch.bfloat16)])
def test_kernel_column_major_down(T, grouped, dtype):
    from condify.ops.triton.expert_mlp import expert_mlp_launch

    a = make(T=T, glu=True, bias=True, dtype=dtype, d_out=100)
    ref = loop_oracle(**f64(a), activation="silu")
    b = {**a, "w_down": column_major(a["w_down"])}
    assert_close(call(expert_mlp_launch, b, "silu", grouped=grouped), ref, dtype)


@needs_interpreter
@pytest.mark.parametrize("grouped", [False, True])
def test_kernel_zero_and_all_experts(grouped):
    from condify.ops.triton.expert_mlp import expert_mlp_launch

    a = make(T=3, p=0.0)
    a["mask"][1] = True  # token 0 and 2: no expert, token 1: all experts
    out = call(expert_mlp_launch, a, "silu", grouped=grouped)
    assert torch.equal(out[0], torch.zeros(72)) and torch.equal(out[2], torch.zeros(72))
    torch.testing.assert_close(out, call(expert_mlp_reference, a, "silu"), rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("glu", [True, False])
def test_custom_op_flops_counted_from_mask(glu):
    """FlopCounterMode sees the opaque custom op through its registered formula, from the real mask."""
    from torch.utils.flop_counter import FlopCounterMode

    from condify.ops._dispatch import register_flop_formulas

    register_flop_formulas()
    a = make(T=5, glu=glu, p=0.4, d_out=40)
    with FlopCounterMode(display=False) as counter:
        call(torch.ops.condify.expert_mlp, a, "silu")
    neurons = int(a["mask"].sum()) * a["expert_size"]
    assert counter.get_total_flops() == 2 * neurons * (72 * (2 if glu else 1) + 40)


@needs_interpreter
def test_group_tokens():
    from condify.ops.triton.expert_mlp import group_tokens

    mask = torch.rand(37, 9) < 0.3
    tok, off, cnt = group_tokens(mask)
    assert tok.shape == (37 * 9 + 1,)
    for e in range(9):
        want = mask[:, e].nonzero().squeeze(1)
        assert cnt[e] == len(want)
        assert torch.equal(tok[off[e] : off[e] + cnt[e]].long(), want)


@needs_interpreter
@pytest.mark.parametrize(
    ("glu", "activation", "dtype"),
    [(True, "silu", torch.float64), (False, "gelu_tanh", torch.float64), (True, "gelu", torch.bfloat16)],
)
def test_custom_op_backward_matches_reference(glu, activation, dtype):
    a = make(T=5, d=24, inter=64, s=16, glu=glu, bias=True, dtype=dtype, requires_grad=True)
    leaves = [v for v in a.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.randn(5, 24, dtype=dtype)
    out = call(torch.ops.condify.expert_mlp, a, activation)
    got = torch.autograd.grad((out * g).sum(), leaves)
    want = torch.autograd.grad((call(expert_mlp_reference, a, activation) * g).sum(), leaves)
    for w, o in zip(want, got, strict=True):
        assert_close(o, w, dtype)


@needs_interpreter
def test_custom_op_opcheck_and_compile():
    a = make(T=2, d=16, inter=32, s=8, bias=True, requires_grad=True)
    args = (a["x"], a["w_up"], a["w_down"], a["mask"], 8, "silu", a["w_gate"], a["b_up"], a["b_gate"])
    torch.library.opcheck(torch.ops.condify.expert_mlp.default, args)

    def f(*args):
        return torch.ops.condify.expert_mlp(*args) * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(out, 2 * expert_mlp_reference(*args), rtol=1e-5, atol=1e-5)


def test_autotune_prune():
    import triton

    from condify.ops.triton.expert_mlp import _prune

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m in (16, 64) for n in (16, 64, 128)]
    kept = _prune(configs, {"T": 1, "S": 32}, GROUPED=False)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {(16, 16)}
    kept = _prune(configs, {"T": 512}, S=64, GROUPED=True)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {
        (m, n) for m in (16, 64) for n in (16, 64)
    }


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from condify.ops.triton import expert_mlp as em, tokens as tk

target = GPUTarget("cuda", 90, 32)
W = ("x_ptr", "w_up_ptr", "w_gate_ptr", "b_up_ptr", "b_gate_ptr", "w_down_ptr")
fn = em._expert_mlp_kernel.fn
for dt, grouped, act, gate, bn in [("bf16", False, 1, True, 16), ("bf16", True, 2, True, 128), ("fp32", True, 0, False, 64)]:
    ptr = lambda n: "*" + dt if n in W else "*fp32" if n == "out_ptr" else "*i32" if grouped and n != "mask_ptr" else "*u8"
    sig = {n: ptr(n) if n.endswith("_ptr") else "i32" if n in ("T", "D", "D_OUT", "I", "SD_OUT", "SD_I", "E", "T_BUCKET") else "constexpr" for n in fn.arg_names}
    c = dict(S=64, ACT=act, HAS_GATE=gate, HAS_B_UP=True, HAS_B_GATE=gate, GROUPED=grouped, UPCAST=dt == "fp32",
             PRECISION="tf32" if dt == "fp32" else "ieee", BLOCK_M=64 if grouped else 16, BLOCK_N=bn, BLOCK_K=64, BLOCK_D=128)
    triton.compile(ASTSource(fn, sig, c), target=target, options=dict(num_warps=4, num_stages=3))
fn = tk._compact_tokens_kernel
triton.compile(ASTSource(fn, {"keep_ptr": "*u8", "index_ptr": "*i64", "count_ptr": "*i64", "T": "i32", "BLOCK_T": "constexpr"}, {"BLOCK_T": 1024}), target=target)
fn = tk._scatter_tokens_kernel
sig = {n: "*bf16" if n.endswith("_ptr") else "i32" for n in fn.arg_names[:9]}
sig.update(index_ptr="*i64", count_ptr="*i64", HAS_SCALE="constexpr", BLOCK_K="constexpr", BLOCK_D="constexpr")
triton.compile(ASTSource(fn, sig, {"HAS_SCALE": True, "BLOCK_K": 16, "BLOCK_D": 256}), target=target)
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """Lower every kernel to a Hopper (sm_90) binary without a GPU: catches what the interpreter cannot
    (dot shapes, dtype rules, layouts). Needs Triton's bundled ptxas; skipped without it."""
    from pathlib import Path

    import triton

    if not list(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*")):
        pytest.skip("triton's ptxas not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# bad input, import hygiene
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs():
    a = make(T=3)
    with pytest.raises(ValueError, match="contiguous"):
        call(expert_mlp, {**a, "w_up": torch.randn(72, 200).t()}, "silu")
    with pytest.raises(ValueError, match="w_down must be contiguous or column-major"):
        call(expert_mlp, {**a, "w_down": torch.randn(72, 400)[:, ::2]}, "silu")
    with pytest.raises(TypeError, match="dtype"):
        call(expert_mlp, {**a, "w_down": a["w_down"].double()}, "silu")
    with pytest.raises(ValueError, match="mask"):
        call(expert_mlp, {**a, "mask": a["mask"][:, :-1]}, "silu")
    with pytest.raises(ValueError, match="mask"):
        call(expert_mlp, {**a, "mask": a["mask"].float()}, "silu")
    with pytest.raises(ValueError, match="multiple of expert_size"):
        call(expert_mlp, {**a, "expert_size": 7}, "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        call(expert_mlp, a, "swish")
    with pytest.raises(ValueError, match="CUDA"):
        call(expert_mlp_triton, a, "silu")


def test_import_does_not_load_triton_or_cuda():
    code = "import sys, torch, condify, condify.ops; assert 'triton' not in sys.modules, 'triton imported'; assert not torch.cuda.is_initialized()"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_reference(T, dtype):
    a = make(T=T, d=256, inter=1024, s=32, bias=True, dtype=dtype)
    a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    ref = call(expert_mlp_reference, f64(a), "silu")
    assert_close(call(expert_mlp, a, "silu"), ref, dtype)
    assert_close(call(expert_mlp_triton, a, "silu"), ref, dtype)


@pytest.mark.gpu
def test_cuda_backward_and_compile():
    a = make(T=16, d=128, inter=512, s=32, bias=True, requires_grad=True)
    a = {
        k: v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
        for k, v in a.items()
    }
    leaves = [v for v in a.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    got = torch.autograd.grad(call(expert_mlp, a, "silu").square().sum(), leaves)
    want = torch.autograd.grad(call(expert_mlp_reference, a, "silu").square().sum(), leaves)
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-3, atol=1e-3)
    compiled = torch.compile(lambda *args: expert_mlp(*args), fullgraph=True)
    out = call(compiled, a, "silu")
    torch.testing.assert_close(out, call(expert_mlp_reference, a, "silu"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize(("glu", "bias", "activation"), [(True, True, "silu"), (False, True, "gelu_tanh")])
def test_oracle_matches_loop(T, glu, bias, activation):
    """The few-line masked-dense oracle (``expert_mlp_reference``) is the naive loop's function."""
    a = make(T=T, glu=glu, bias=bias)
    assert_close(
        call(expert_mlp_reference, a, activation), loop_oracle(**f64(a), activation=activation), torch.float32
    )
