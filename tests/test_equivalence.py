"""Equivalences every registered method keeps (``condify.registry.all_methods()``, so methods added later are
covered), on a tiny llama with its new parameters randomised (routing is non-trivial):

- dense at init where the method promises it (layer-parallel is not dense by design);
- ``unmodify`` restores the dense model exactly (logits and tensors bitwise);
- save / load is exact (logits bitwise, same configs);
- cached ``generate()`` gives what recomputing without a cache gives (greedy, sampling, beams);
- gradient checkpointing leaves the gradients as they are; the model runs in bf16;
- batch invariance: a sequence's logits do not depend on the other sequences of its batch;
- 2,000 decode steps do not grow the process memory;

and property tests (hypothesis) of the kernels' plain-torch references against naive per-token loops.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny

import condify
from condify import registry
from condify.ops import (
    compact_tokens_reference,
    expert_mlp,
    expert_mlp_reference,
    expert_mlp_torch,
    scatter_tokens_reference,
)
from condify.patching import patched

METHODS = [m.name for m in registry.all_methods()]
# options for the 6-layer tiny llama (intermediate 96); `routed`: options that make routing non-trivial
OPTIONS = {
    "layer-parallel": {"pairs": 1, "start": 2},
    "dynamic-k": {"expert_size": 8},
    "lte": {"expert_size": 8},
    "mot": {"num_experts": 4, "stage": "moe"},  # token choice: the batch-grouped "mot" stage mixes sequences
}
ROUTED = {"dynamic-k": {"tau": 0.5}}
NOT_DENSE_AT_INIT = {
    "layer-parallel": "pairs run in parallel by design",
    "mot": "experts mix the tokens of a group",
}


def _model(
    method: str, routed: bool = True, arch: str = "llama", **overrides
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, converted) tiny models; with ``routed`` the converted one has random new parameters."""
    dense = tiny(arch, **overrides)
    model = tiny(arch, **overrides)
    opts = {**OPTIONS.get(method, {}), **(ROUTED.get(method, {}) if routed else {})}
    condify.modify(model, method, **opts)
    if routed:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, m in patched(model, method):
                for c in m._condify_patch.children:
                    for p in m.get_submodule(c).parameters():
                        fan_in = p.shape[-1] if p.dim() > 1 else 1
                        p.copy_(torch.randn(p.shape, generator=gen) * 20.0 / fan_in**0.5)
    return dense.eval(), model.eval()


def _ids(b: int = 3, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("method", METHODS)
def test_dense_at_init(method):
    if method in NOT_DENSE_AT_INIT:
        pytest.skip(f"{method} is not dense at init: {NOT_DENSE_AT_INIT[method]}")
    dense, model = _model(method, routed=False)
    x = _ids()
    torch.testing.assert_close(_logits(model, x), _logits(dense, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_unmodify_is_exact(method):
    dense, model = _model(method)
    x = _ids()
    ref = _logits(dense, x)
    assert not torch.allclose(_logits(model, x), ref, atol=1e-4) or method not in NOT_DENSE_AT_INIT
    condify.unmodify(model)
    assert torch.equal(_logits(model, x), ref)
    a, b = model.state_dict(), dense.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.is_contiguous() for v in a.values())
    assert repr(model) == repr(dense) and not hasattr(model.config, "condify")


# sandwich norms (Gemma-2), post-norms only (OLMo-2), a residual scale (Granite), a plain MLP with biases
# (StarCoder2), the structural fallback on a fused gate|up MLP (GLM: no adapter names it)
@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "granite", "starcoder2", "glm"])
@pytest.mark.parametrize("method", METHODS)
def test_other_architectures(method, arch):
    if method not in NOT_DENSE_AT_INIT:
        dense, model = _model(method, routed=False, arch=arch)
        x = _ids()
        torch.testing.assert_close(_logits(model, x), _logits(dense, x), atol=1e-5, rtol=1e-5)
    dense, model = _model(method, arch=arch)
    x = _ids(2, 7)
    assert not torch.allclose(_logits(model, x), _logits(dense, x), atol=1e-4)  # routing is not trivial
    kw = dict(
        max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
    whole = _logits(model, cached.sequences)
    for i, step in enumerate(cached.logits):
        torch.testing.assert_close(step, whole[:, x.shape[1] - 1 + i], atol=1e-4, rtol=1e-4)
    condify.unmodify(model)
    assert torch.equal(_logits(model, x), _logits(dense, x))


@pytest.mark.parametrize("method", METHODS)
def test_save_load_is_exact(method, tmp_path):
    _, model = _model(method)
    x = _ids()
    out = _logits(model, x)
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded, x), out)
    assert condify.applied_configs(loaded) == condify.applied_configs(model)
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_cached_generate_equals_recompute(method):
    _, model = _model(method)
    x = _ids(2, 7)
    kw = dict(
        max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        full = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and every cached step's logits are those of one full forward over the generated sequence
    whole = _logits(model, cached.sequences)
    for i, step in enumerate(cached.logits):
        torch.testing.assert_close(step, whole[:, x.shape[1] - 1 + i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_sampling_and_beam_generate_cached_equals_recompute(method):
    """Sampling (same seed) and beam search pick the same tokens with and without the cache."""
    _, model = _model(method)
    x = _ids(2, 7)
    for kw in ({"do_sample": True, "top_k": 20}, {"do_sample": False, "num_beams": 3}):
        out = []
        for use_cache in (True, False):
            torch.manual_seed(0)
            with torch.no_grad():
                out.append(model.generate(x, max_new_tokens=6, pad_token_id=0, use_cache=use_cache, **kw))
        assert torch.equal(*out), kw


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method):
    """``gradient_checkpointing_enable()`` leaves loss and every gradient as they are without it."""
    _, model = _model(method)
    model.train()
    x = _ids(2, 9)
    grads = []
    for enable in (False, True):
        if enable:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.zero_grad()
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        grads.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_model_runs_close_to_fp32(method):
    """The whole converted model in bf16: finite logits close to its fp32 logits, and it generates."""
    _, model = _model(method, routed=False)
    x = _ids(2, 8)
    ref = _logits(model, x)
    model.to(torch.bfloat16)
    got = _logits(model, x)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.05)
    with torch.no_grad():
        seq = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seq.shape == (2, 12)


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance(method):
    _, model = _model(method)
    x = _ids(4, 9)
    batched = _logits(model, x)
    for i in range(x.shape[0]):
        torch.testing.assert_close(_logits(model, x[i : i + 1])[0], batched[i], atol=1e-5, rtol=1e-5)


def _rss() -> int:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:  # Linux: current resident pages
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("method", METHODS)
def test_decode_2000_steps_without_memory_growth(method):
    """2,000 one-token decode steps (the KV cache restarted every 50 steps, so its size is bounded), under
    ``condify.track``: the resident memory after the first 500 steps must not keep growing (leaked hooks,
    counters, caches). Skipped when the machine is too busy to run it in about 20 s."""
    import inspect

    from transformers import DynamicCache

    _, model = _model(method, num_hidden_layers=4)
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    prompt = _ids(1, 4)
    steps, restart = 2000, 50
    rss = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps: threads only add overhead on a shared machine
    try:
        t0 = time.perf_counter()
        with torch.no_grad(), condify.track(model):
            for step in range(steps):
                if step % restart == 0:
                    out = model(prompt, use_cache=True, **{key: DynamicCache(config=model.config)})
                tok = out.logits[:, -1:].argmax(-1)
                out = model(tok, use_cache=True, **{key: out.past_key_values})
                if step == 100 and time.perf_counter() - t0 > 1.0:
                    pytest.skip("too slow on this machine for 2,000 steps in about 20 s")
                if step + 1 in (500, steps):
                    gc.collect()
                    rss[step + 1] = _rss()
    finally:
        torch.set_num_threads(threads)
    growth = rss[steps] - rss[500]
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 1,500 decode steps"


# ----------------------------------------------------------------------------------------------------------
# kernels' references vs naive per-token loops (hypothesis)
# ----------------------------------------------------------------------------------------------------------

ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "relu": F.relu,
}


def _naive_expert_mlp(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate):
    out = torch.zeros(x.shape[0], w_down.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in range(mask.shape[1]):
            if not mask[t, e]:
                continue
            blk = slice(e * s, (e + 1) * s)
            up = w_up[blk].double() @ x[t].double() + (0 if b_up is None else b_up[blk].double())
            if w_gate is None:
                h = ACTS[act](up)
            else:
                g = w_gate[blk].double() @ x[t].double() + (0 if b_gate is None else b_gate[blk].double())
                h = ACTS[act](g) * up
            out[t] += w_down[:, blk].double() @ h
    return out


@st.composite
def expert_cases(draw):
    T = draw(st.integers(1, 12))
    d = draw(st.integers(1, 12))
    s = draw(st.integers(1, 5))
    E = draw(st.integers(1, 6))
    d_out = draw(st.integers(1, 12))
    gated = draw(st.booleans())
    bias = draw(st.booleans())
    act = draw(st.sampled_from(sorted(ACTS)))
    kind = draw(st.sampled_from(["all", "none", "random"]))
    strategy = draw(st.sampled_from(["auto", "spans", "grouped", "dense"]))
    column_major = draw(st.booleans())  # w_down stored column-major, as dynamic-k keeps it
    seed = draw(st.integers(0, 2**31 - 1))
    return T, d, s, E, d_out, gated, bias, act, kind, strategy, column_major, seed


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expert_cases())
def test_expert_mlp_reference_matches_a_per_token_loop(case):
    T, d, s, E, d_out, gated, bias, act, kind, strategy, column_major, seed = case
    g = torch.Generator().manual_seed(seed)
    inter = s * E
    x = torch.randn(T, d, generator=g)
    w_up = torch.randn(inter, d, generator=g) / d**0.5
    w_down = torch.randn(d_out, inter, generator=g) / inter**0.5
    if column_major:
        w_down = w_down.t().contiguous().t()
    w_gate = torch.randn(inter, d, generator=g) / d**0.5 if gated else None
    b_up = torch.randn(inter, generator=g) if bias else None
    b_gate = torch.randn(inter, generator=g) if bias and gated else None
    mask = {
        "all": torch.ones(T, E, dtype=torch.bool),
        "none": torch.zeros(T, E, dtype=torch.bool),
        "random": torch.rand(T, E, generator=g) < 0.5,
    }[kind]
    want = _naive_expert_mlp(x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate)
    args = (x, w_up, w_down, mask, s, act, w_gate, b_up, b_gate)
    # the oracle, the tuned plain-torch strategies, and the dispatching op (the compiled CPU kernel here)
    for got in (expert_mlp_reference(*args), expert_mlp_torch(*args, strategy=strategy), expert_mlp(*args)):
        assert got.shape == (T, d_out) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    if kind == "none":
        assert torch.equal(got, torch.zeros_like(got))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 16),
    st.sampled_from(["all", "none", "random"]),
    st.integers(0, 2**31 - 1),
)
def test_compact_tokens_reference_is_a_stable_partition(B, T, kind, seed):
    g = torch.Generator().manual_seed(seed)
    keep = {"all": torch.ones(B, T, dtype=torch.bool), "none": torch.zeros(B, T, dtype=torch.bool)}.get(
        kind, torch.rand(B, T, generator=g) < 0.5
    )
    index, count = compact_tokens_reference(keep)
    assert index.shape == (B, T) and index.dtype == count.dtype == torch.int64
    for b in range(B):
        kept = [t for t in range(T) if keep[b, t]]
        skipped = [t for t in range(T) if not keep[b, t]]
        assert int(count[b]) == len(kept)
        assert index[b].tolist() == kept + skipped


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 10), st.integers(1, 6), st.booleans(),
    st.sampled_from(["all", "none", "random"]), st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_scatter_tokens_reference_matches_a_loop(B, T, D, scaled, kind, seed):
    g = torch.Generator().manual_seed(seed)
    keep = {"all": torch.ones(B, T, dtype=torch.bool), "none": torch.zeros(B, T, dtype=torch.bool)}.get(
        kind, torch.rand(B, T, generator=g) < 0.5
    )
    index, count = compact_tokens_reference(keep)
    K = int(count.max()) if B else 0
    K = max(K, 1)
    index = index[:, :K].contiguous()
    base = torch.randn(B, T, D, generator=g)
    update = torch.randn(B, K, D, generator=g)
    scale = torch.rand(B, K, generator=g) if scaled else None
    got = scatter_tokens_reference(base, update, index, count, scale)
    want = base.clone().double()
    for b in range(B):
        for k in range(int(count[b])):
            want[b, index[b, k]] += (1.0 if scale is None else float(scale[b, k])) * update[b, k].double()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
