"""dynamic-k with ``attention=True``: projections -> distilled ReLU MLPs -> dynamic-k experts."""

from __future__ import annotations

import pytest
import torch
from test_dynamic_k import KINDS, data, ids, logits, same_state, snapshot, tiny

import condify
from condify.methods.dynamic_k import executed_fraction, mode, track_executed
from condify.methods.dynamic_k.modules import converted
from condify.methods.dynamic_k.projection import ProjectionMLP


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("d_in,d_out,hidden", [(12, 12, 24), (12, 5, 10), (5, 12, 10), (12, 12, 8)])
def test_projection_init_is_best_low_rank_map(d_in: int, d_out: int, hidden: int) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out)
    mlp = ProjectionMLP(d_in, hidden, d_out, bias=True)
    mlp.init_from_linear(lin.weight, lin.bias)
    x = torch.randn(50, d_in)
    y = mlp.down(torch.relu(mlp.up(x)))
    k = min(hidden // 2, d_in, d_out)
    u, s, vh = torch.linalg.svd(lin.weight)
    best = x @ (u[:, :k] * s[:k] @ vh[:k]).t() + lin.bias  # Eckart-Young: the best rank-k map
    torch.testing.assert_close(y, best, atol=1e-5, rtol=1e-5)
    if k == min(d_in, d_out):
        torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)
    assert (mlp.up(x).relu() == 0).float().mean() >= 0.5  # each ± pair has one zero


@pytest.mark.parametrize("kind", KINDS)
def test_attention_exact_at_full_width_and_unmodify(kind: str) -> None:
    model = tiny(kind)
    x = ids()
    ref, before = logits(model, x), snapshot(model)
    # width 4 x the parameter-matched width holds every singular direction of a square map, and
    # 2 * min(d_in, d_out) for the others: the converted model equals the dense one at tau = 0
    condify.modify(model, "dynamic-k", expert_size=8, attention=True, attention_width=4.0, clustering="gate")
    sites = converted(model, "attention")
    assert len(sites) == 2 * (2 if kind in ("phi3", "gpt2") else 4)
    assert all(
        not torch.equal(m.expert_layout.perm, torch.arange(m.expert_layout.perm.numel())) for _, m in sites
    )
    assert before.keys() <= snapshot(model).keys()  # original names kept; new ones added
    torch.testing.assert_close(logits(model, x), ref, atol=1e-4, rtol=1e-4)
    condify.unmodify(model)
    assert same_state(snapshot(model), before)
    torch.testing.assert_close(logits(model, x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_attention_calibrate_distils_routes_and_saves(kind: str, tmp_path) -> None:
    model = tiny(kind)
    x = ids()
    ref = logits(model, x)
    condify.modify(model, "dynamic-k", expert_size=8, attention=True, attention_expert_size=4)
    with mode(model, "original"):  # the original linear maps: exactly dense
        torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    res = condify.calibrate(
        model, data(), attention_steps=150, router_steps=50, target_sparsity=0.5, progress=False
    )
    assert res["attention_rel_error_after"] < 0.8 * res["attention_rel_error_before"]
    assert 0.3 < res["executed"] < 0.7 and 0.3 < res["executed_attention"] < 0.7
    assert res["ppl_after_attention_distill"] < 1.5 * res["dense_ppl"]
    assert all(float(m.expert_layout.tau) > 0 for _, m in converted(model))
    out = logits(model, x)
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded, x), out, atol=0, rtol=0)
    assert len(converted(loaded, "attention")) == len(converted(model, "attention"))


def test_attention_flops_tracking_and_oracle() -> None:
    from condify.evaluate import executed_flops

    model = tiny("llama")
    dense = executed_flops(model, ids(1, 16))
    condify.modify(model, "dynamic-k", expert_size=8, attention=True, attention_expert_size=4)
    # attention_width=1: the replacing MLPs have about the projections' weights and FLOPs (tau = 0)
    assert executed_flops(model, ids(1, 16))["attention"] == pytest.approx(dense["attention"], rel=0.15)
    sites = converted(model, "attention")
    for _, m in converted(model):
        m.expert_layout.tau.fill_(1.0)  # each token runs its top expert only
    with track_executed(model) as stats:
        logits(model, ids())
    experts = sum(m._condify_patch.state.experts for _, m in sites)  # one expert per token and site
    assert executed_fraction(stats, [p for p, _ in sites]) == pytest.approx(len(sites) / experts, rel=0.05)
    with mode(model, "oracle"):
        assert torch.isfinite(logits(model, ids())).all()
