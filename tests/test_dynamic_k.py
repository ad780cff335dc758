"""dynamic-k (D2DMoE): conversion, layout, routers, thresholds, save/load, bad inputs."""

from __future__ import annotations

import pytest
import torch
from small import ids, logits, one_thread, same_state, small, snapshot  # noqa: F401 (autouse fixture)

import condify
from condify.methods.dynamic_k import DynamicKConfig, executed_fraction, mode, track_executed
from condify.methods.dynamic_k.clustering import balanced_assign, balanced_kmeans
from condify.methods.dynamic_k.modules import converted, select
from condify.methods.dynamic_k.transform import relayout_

KINDS = ["llama", "qwen2", "gemma", "phi3", "gpt2"]


def tiny(kind: str = "llama", inter: int = 64) -> torch.nn.Module:
    return small(kind, inter, noise="gpt2-bias")  # biases are zero at init; make GPT-2's matter


def data(n: int = 6) -> list[torch.Tensor]:
    return [ids(4, 32, seed=s) for s in range(n)]


def blocks_contiguous(model: torch.nn.Module) -> bool:
    """Every converted MLP stores its experts as contiguous blocks: gate/up rows, w_down columns."""
    for _, m in converted(model, "mlp"):
        w = m._condify_patch.state.adapter.mlp_weights(m)
        rows = [w[k] for k in ("gate", "up") if w[k] is not None]
        if not (all(r.is_contiguous() for r in rows) and w["down"].t().is_contiguous()):
            return False
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_tau0_dense_and_unmodify_exact(kind: str) -> None:
    model = tiny(kind)
    x = ids()
    ref, before = logits(model, x), snapshot(model)
    condify.modify(model, "dynamic-k", expert_size=8, clustering="gate")
    perms = [m.expert_layout.perm for _, m in converted(model)]
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms)  # really permuted in place
    assert blocks_contiguous(model)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    condify.unmodify(model)
    assert same_state(snapshot(model), before)
    assert all(p.is_contiguous() for p in model.parameters())  # the layout transformers made


def test_balanced_clusters_exact_sizes() -> None:
    feats = torch.randn(96, 10) + torch.randn(3, 10).repeat_interleave(torch.tensor([60, 30, 6]), 0) * 3
    for k in (2, 4, 12, 96):
        assert torch.bincount(balanced_kmeans(feats, k), minlength=k).tolist() == [96 // k] * k
    cost = torch.rand(50, 5)
    assert torch.bincount(balanced_assign(cost, 10)).tolist() == [10] * 5


def test_permutation_preserves_function_and_is_recorded() -> None:
    model = tiny("gpt2")
    x = ids()
    ref, before = logits(model, x), snapshot(model)
    condify.modify(model, "dynamic-k", expert_size=16, clustering="coactivation")
    for _, m in converted(model):
        relayout_(m, m._condify_patch.state.adapter, torch.randperm(64))
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    condify.calibrate(model, data(), router_steps=0, progress=False)  # co-activation clustering on data
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    condify.unmodify(model)
    assert same_state(snapshot(model), before)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_selection_rule_matches_naive_loop(kind: str) -> None:
    model = tiny(kind)
    condify.modify(model, "dynamic-k", expert_size=8, tau=0.6)
    path, mlp = converted(model)[0]
    a = mlp._condify_patch.state.adapter
    x = torch.randn(7, 32)
    with torch.no_grad():
        out = mlp(x)
        w = a.mlp_weights(mlp)
        act = torch.nn.functional.gelu if kind == "gpt2" else torch.nn.functional.silu
        for t in range(7):
            s = mlp.router(x[t])
            chosen = {e for e in range(8) if s[e] >= 0.6 * s.max()} | {int(s.argmax())}
            y = w["b_down"].clone() if w["b_down"] is not None else torch.zeros(32)
            for e in chosen:
                blk = slice(8 * e, 8 * e + 8)
                g = x[t] @ (w["gate"] if w["gate"] is not None else w["up"])[blk].t()
                if kind == "gpt2":
                    h = torch.nn.functional.gelu(g + w["b_up"][blk], approximate="tanh")
                else:
                    h = act(g) * (x[t] @ w["up"][blk].t())
                y = y + h @ w["down"][:, blk].t()
            torch.testing.assert_close(out[t], y, atol=1e-5, rtol=1e-5)
        assert select(torch.tensor([[0.0, 0.0]]), 0.5).tolist() == [[True, True]]  # ties at max run


def test_router_regression_target_sparsity_and_oracle() -> None:
    model = tiny("llama", inter=128)
    condify.modify(model, "dynamic-k", expert_size=8)
    batches = data(8)
    res = condify.calibrate(model, batches, router_steps=150, target_sparsity=0.5, progress=False)
    assert res["router_mse_after"] < 0.5 * res["router_mse_before"]
    assert abs(res["executed"] - 0.5) < 0.1  # held-out batch, sparse run
    with torch.no_grad(), track_executed(model) as stats:
        for b in batches[:-1]:
            model(b, use_cache=False)
    assert abs(executed_fraction(stats) - 0.5) < 0.05  # calibration data
    with torch.no_grad(), mode(model, "oracle"), track_executed(model) as stats:
        model(batches[0], use_cache=False)
    assert 0 < executed_fraction(stats) < 1
    assert condify.applied_configs(model)[0].target_sparsity == 0.5


def test_sensitivity_allocation_spares_the_layer_that_matters() -> None:
    model = small("llama", 128, layers=3)
    with torch.no_grad():  # layer 1's MLP barely reaches the residual stream: it can run few experts
        model.model.layers[1].mlp.down_proj.weight.mul_(0.02)
    condify.modify(model, "dynamic-k", expert_size=8)
    batches = data(8)
    res = condify.calibrate(
        model, batches, router_steps=100, target_sparsity=0.5, allocation="sensitivity", adapt_steps=0,
        sensitivity_tokens=256, progress=False,
    )  # fmt: skip
    with torch.no_grad(), condify.track(model) as t:
        for b in batches[:-1]:
            model(b, use_cache=False)
    layer = t.per_layer("dynamic-k", "mlp")
    assert layer[1] < 0.3 and layer[1] <= min(layer[0], layer[2]) and max(layer.values()) > 0.6, layer
    assert abs(t.fraction("dynamic-k", "mlp") - 0.5) < 0.05  # the budget is the same as uniform's
    assert len(set(res["tau"].values())) == 3


def test_order_experts_keeps_function_and_joins_runs() -> None:
    from condify.batches import as_batches
    from condify.methods.dynamic_k.calibrate import _collect_inputs
    from condify.methods.dynamic_k.thresholds import order_experts_, runs_per_token

    model = tiny("llama", inter=128)
    condify.modify(model, "dynamic-k", expert_size=8)
    batches = data(8)
    condify.calibrate(model, batches, router_steps=50, target_sparsity=0.5, reorder=False, progress=False)
    x, before = ids(3, 20), snapshot(model)
    ref = logits(model, x)
    cal = _collect_inputs(model, as_batches(batches, torch.device("cpu")), 1024)
    res = order_experts_(model, cal)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)  # same selections, same function
    runs = [
        runs_per_token(select(m.router(cal[p][0]), float(m.expert_layout.tau))) for p, m in converted(model)
    ]
    assert sum(runs) / len(runs) == pytest.approx(res["runs_per_token_after"])
    assert res["runs_per_token_after"] < res["runs_per_token_before"]
    # a planted structure: experts {0, 5} and {2, 7} always run together -> one run each after ordering
    from condify.methods.dynamic_k.thresholds import adjacent_order

    planted = torch.zeros(100, 8, dtype=torch.bool)
    planted[::2, [0, 5]] = True
    planted[1::2, [2, 7]] = True
    assert runs_per_token(planted) == 2 and runs_per_token(planted[:, adjacent_order(planted)]) == 1
    assert runs_per_token(torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)) == 4 / 3
    condify.unmodify(model)
    assert snapshot(model).keys() < before.keys()


def test_sparsify_step_relu_and_hoyer() -> None:
    model = tiny("qwen2")
    condify.modify(model, "dynamic-k", expert_size=8)
    res = condify.calibrate(
        model, data(), sparsify=True, sparsify_steps=20, sparsify_lr=3e-3, penalty_weight=1e-2,
        router_steps=0, progress=False,
    )  # fmt: skip
    assert condify.applied_configs(model)[0].activation == "relu"
    assert res["activation_sparsity_after"] > 0.5 > res["activation_sparsity_before"]
    assert res["ppl_after_sparsify"] > 0


def test_masked_mode_is_sparse_and_adapt_trains_under_routing() -> None:
    model, dense = tiny("llama"), tiny("llama")
    with torch.no_grad():  # peaked predictions, so that routing error shows in the KL
        for m in (model, dense):
            m.lm_head.weight.mul_(30)
    condify.modify(model, "dynamic-k", expert_size=8, clustering="coactivation")
    condify.calibrate(model, data(), router_steps=50, target_sparsity=0.5, adapt_steps=0, progress=False)
    x = ids()
    with track_executed(model) as st:
        sparse = logits(model, x)
    with mode(model, "masked"), track_executed(model) as st_masked:
        torch.testing.assert_close(logits(model, x), sparse, atol=1e-5, rtol=0)
    assert st == st_masked and executed_fraction(st) < 0.8
    routers = {k: v for k, v in snapshot(model).items() if ".router." in k or "expert_layout" in k}

    def kl() -> float:  # on the fine-tune's own batches: this checks the mechanism, not generalisation
        return sum(
            float(torch.nn.functional.kl_div(
                logits(model, b).log_softmax(-1), logits(dense, b).log_softmax(-1), log_target=True,
                reduction="batchmean",
            ))
            for b in data()[:-1]
        )  # fmt: skip

    before = kl()
    res = condify.calibrate(
        model,
        data(),
        cluster=False,
        router_steps=0,
        adapt_steps=30,
        adapt_lr=3e-4,
        progress=False,
        keep_if_better=False,  # the mechanism, on random data: kept as trained
    )
    assert res["adapt_loss"][1] < res["adapt_loss"][0] and kl() < before
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in routers.items())  # routers and thresholds kept
    assert blocks_contiguous(model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch1_decode_path_matches_full_forward(kind: str) -> None:
    """Cached one-token steps (the Python-list decode path) == the full forward (the mask path)."""
    model = tiny(kind)
    condify.modify(model, "dynamic-k", expert_size=8, clustering="coactivation")
    condify.calibrate(model, data(), router_steps=50, target_sparsity=0.5, progress=False)
    x = ids(1, 12)
    with torch.no_grad(), track_executed(model) as full_st:
        full = model(x).logits
    with torch.no_grad(), track_executed(model) as step_st:
        out = model(x[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert step_st == full_st and 0.3 < executed_fraction(full_st) < 0.8


def test_save_load_exact(tmp_path) -> None:
    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=16, clustering="coactivation")
    condify.calibrate(
        model, data(), sparsify=True, sparsify_steps=2, router_steps=20, target_sparsity=0.4, progress=False
    )
    x = ids()
    ref = logits(model, x)
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path).eval()
    assert same_state(snapshot(loaded), snapshot(model)) and blocks_contiguous(loaded)
    torch.testing.assert_close(logits(loaded, x), ref, atol=0, rtol=0)
    assert condify.applied_configs(loaded)[0] == condify.applied_configs(model)[0]


def test_bad_inputs_leave_model_unchanged() -> None:
    model = tiny("llama", inter=96)
    before = snapshot(model)
    with pytest.raises(condify.ConfigError, match=r"sizes that divide it: \[1, 2, 3, 4, 6, 8, 12"):
        condify.modify(model, "dynamic-k", expert_size=10)
    with pytest.raises(condify.ConfigError, match="tau"):
        condify.modify(model, "dynamic-k", tau=-0.1)
    with pytest.raises(condify.ConfigError, match="target_sparsity"):
        condify.modify(model, "dynamic-k", target_sparsity=1.0)
    with pytest.raises(condify.ConfigError, match="attention_width"):
        condify.modify(model, "dynamic-k", attention=True, attention_width=0)
    with pytest.raises(condify.ConfigError, match="attention_expert_size"):
        condify.modify(model, "dynamic-k", attention=True, attention_expert_size=0)
    with pytest.raises(condify.ModifyError, match="modify"):
        condify.calibrate(model, data())
    assert same_state(snapshot(model), before) and condify.applied_configs(model) == []
    condify.modify(model, "dynamic-k", expert_size=8)
    after_modify = snapshot(model)
    with pytest.raises(condify.ConfigError, match="at least"):
        condify.calibrate(model, [ids(1, 8)] * 3, progress=False)
    with pytest.raises(condify.ConfigError, match="target_sparsity"):
        condify.calibrate(model, data(), target_sparsity=-0.5, progress=False)
    with pytest.raises(condify.ConfigError, match="adapt_steps.*target_sparsity"):
        condify.calibrate(model, data(), adapt_steps=5, progress=False)
    with pytest.raises(condify.ConfigError, match="adapt_params"):
        condify.calibrate(model, data(), adapt_steps=5, target_sparsity=0.5, adapt_params="x", progress=False)
    with pytest.raises(condify.ModifyError, match="already"):
        condify.modify(model, "dynamic-k", expert_size=8)
    assert same_state(snapshot(model), after_modify)
    assert isinstance(condify.applied_configs(model)[0], DynamicKConfig)


@pytest.mark.slow
def test_embedded_model_tau0_dense() -> None:
    """tau = 0 on SmolLM2, all 30 MLPs. In the original neuron order (co-activation layout before
    calibration) the logits match dense to 1e-5. After the k-means permutation the function is the same
    but fp32 sums run in another order: measured max |diff| ~5e-5 on logits of magnitude ~20 with 3
    permuted layers; we check 1e-5 relative to the logit scale there."""
    from condify.data import load_model

    model, _ = load_model()
    x = ids(1, 24) * 300
    ref, before = logits(model, x), snapshot(model)
    condify.modify(model, "dynamic-k", expert_size=32, clustering="coactivation")
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)
    condify.unmodify(model)
    condify.modify(model, "dynamic-k", expert_size=32, layers=[0, 14, 29])
    diff = (logits(model, x) - ref).abs().max()
    assert diff <= 1e-5 * ref.abs().max(), float(diff)
    condify.unmodify(model)
    assert same_state(snapshot(model), before)


def test_recipes_are_valid_options() -> None:
    from condify import registry
    from condify.methods.dynamic_k import DynamicKCalibration

    spec = registry.get("dynamic-k")
    assert {"quick", "cpu", "long"} <= set(spec.recipes)
    for r in spec.recipes.values():
        DynamicKConfig.from_options(**r.modify)
        DynamicKCalibration.from_options(**r.calibrate)
    with pytest.raises(condify.ConfigError, match="unknown options"):
        DynamicKCalibration.from_options(num_train_batches=3)


def test_torch_compile_fullgraph_converted_mlp():
    """A converted tiny model's expert layer traces with fullgraph=True on the CPU reference path."""
    from tiny import tiny

    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8, tau=0.5)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, 64)
    eager = mlp(x)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert mlp.up_proj.weight.grad is not None
