"""lte (Learn To be Efficient): conversion, soft/hard/masked modes, calibration stages, save/load, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from small import ids, logits, one_thread, same_state, small, snapshot  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

import condify
from condify.methods.lte import LteCalibration, LteConfig
from condify.methods.lte.modules import converted, mode

KINDS = ["llama", "qwen2", "phi3", "gpt2"]


def tiny(kind: str = "llama", inter: int = 64, layers: int = 2) -> torch.nn.Module:
    return small(kind, inter, layers)


def data(n: int = 8) -> list[torch.Tensor]:
    return [ids(4, 32, seed=s) for s in range(n)]


@torch.no_grad()
def random_routers(model: torch.nn.Module, seed: int = 0) -> None:
    """Routers that select about half of the experts, differently for every token."""
    gen = torch.Generator().manual_seed(seed)
    for _, m in converted(model):
        r = m.router
        r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * 0.5)
        r.bias.copy_(torch.randn(r.bias.shape, generator=gen) * 0.5)


def naive(mlp: torch.nn.Module, x: torch.Tensor, soft: bool) -> torch.Tensor:
    """Per-token, per-expert loop: the oracle of the soft (weighted) and hard (thresholded) modes."""
    st = mlp._condify_patch.state
    w, s, E = st.adapter.mlp_weights(mlp), st.expert_size, st.experts
    act = {"silu": F.silu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[st.activation]
    tau = float(mlp.expert_layout.tau)
    out = []
    for t in range(x.shape[0]):
        scores = torch.sigmoid(mlp.router.weight @ x[t] + mlp.router.bias)
        y = w["b_down"].clone() if w["b_down"] is not None else torch.zeros(w["down"].shape[0])
        for e in range(E):
            if not soft and scores[e] < tau:
                continue
            blk = slice(e * s, (e + 1) * s)
            up = x[t] @ w["up"][blk].t() + (w["b_up"][blk] if w["b_up"] is not None else 0)
            if w["gate"] is not None:
                h = act(x[t] @ w["gate"][blk].t() + (w["b_gate"][blk] if w["b_gate"] is not None else 0)) * up
            else:
                h = act(up)
            g = scores[e] / st.init_score if soft else 1.0
            y = y + g * (h @ w["down"][:, blk].t())
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_at_init_and_unmodify_exact(kind: str) -> None:
    model = tiny(kind)
    x = ids()
    ref, before = logits(model, x), snapshot(model)
    condify.modify(model, "lte", expert_size=8)
    perms = [m.expert_layout.perm for _, m in converted(model)]
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms)  # really permuted in place
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)  # hard mode: every expert runs
    with mode(model, "soft"):
        torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=0)  # init scale folded out
    with condify.track(model) as t:
        logits(model, x)
    assert t.fraction("lte", "mlp") == 1.0 and set(t.per_layer("lte")) == {0, 1}
    condify.unmodify(model)
    assert same_state(snapshot(model), before)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi3"])
def test_modes_match_naive_loop(kind: str) -> None:
    model = tiny(kind)
    condify.modify(model, "lte", expert_size=8)
    random_routers(model)
    _, mlp = converted(model)[1]
    x = torch.randn(7, 32)
    with torch.no_grad(), condify.track(model) as t:
        hard = mlp(x)
    torch.testing.assert_close(hard, naive(mlp, x, soft=False), atol=1e-5, rtol=1e-5)
    assert 0.2 < t.fraction("lte") < 0.8  # a real selection, counted
    with torch.no_grad(), mode(model, "masked"):
        torch.testing.assert_close(mlp(x), hard, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), mode(model, "soft"):
        torch.testing.assert_close(mlp(x), naive(mlp, x, soft=True), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a token may select no expert: only the down bias remains
        mlp.router.bias.fill_(-30.0)
        empty = mlp(x)
    b = mlp._condify_patch.state.adapter.mlp_weights(mlp)["b_down"]
    torch.testing.assert_close(empty, torch.zeros_like(empty) + (0 if b is None else b))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_cache_and_batch_invariance(kind: str) -> None:
    model = tiny(kind)
    condify.modify(model, "lte", expert_size=8)
    random_routers(model)
    x = ids(3, 7)
    full = logits(model, x)
    for i in range(3):  # batch invariance: each row alone == its row in the batch
        torch.testing.assert_close(logits(model, x[i : i + 1]), full[i : i + 1], atol=1e-5, rtol=0)
    with torch.no_grad():  # cached one-token steps == the full forward
        out = model(x[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        cached = model.generate(x, attention_mask=torch.ones_like(x), use_cache=True, **kw)
        recompute = model.generate(x, attention_mask=torch.ones_like(x), use_cache=False, **kw)
    assert torch.equal(cached, recompute)


def test_save_load_exact(tmp_path) -> None:
    model = tiny("llama")
    condify.modify(model, "lte", expert_size=8)
    condify.calibrate(model, data(), target_sparsity=0.5, soft_steps=3, hard_steps=2, progress=False)
    x = ids()
    ref = logits(model, x)
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path).eval()
    assert same_state(snapshot(loaded), snapshot(model))
    torch.testing.assert_close(logits(loaded, x), ref, atol=0, rtol=0)
    cfg = condify.applied_configs(loaded)[0]
    assert (
        cfg == condify.applied_configs(model)[0] and cfg.calibrated == "hard" and cfg.target_sparsity == 0.5
    )
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers: a dense model
    assert logits(vanilla, x).shape == ref.shape


def test_calibrate_meets_target_and_stage2_lowers_kl() -> None:
    model, dense = tiny("llama", inter=128, layers=4), tiny("llama", inter=128, layers=4)
    with torch.no_grad():  # peaked predictions, so that routing error shows in the KL
        for m in (model, dense):
            m.lm_head.weight.mul_(30)
    condify.modify(model, "lte", expert_size=8)
    before = snapshot(model)
    batches = data(9)

    def kl() -> float:  # on the fine-tune's own batches: this checks the mechanism, not generalisation
        return sum(
            float(F.kl_div(logits(model, b).log_softmax(-1), logits(dense, b).log_softmax(-1),
                           log_target=True, reduction="batchmean"))
            for b in batches[:-1]
        )  # fmt: skip

    res = condify.calibrate(model, batches, target_sparsity=0.5, stage="soft", soft_steps=20, progress=False)
    assert abs(res["executed_fit"] - 0.5) < 0.05 and abs(res["executed"] - 0.5) < 0.15  # fit / held-out
    assert set(res["executed_per_layer"]) == {0, 1, 2, 3} and res["tokens"] == 20 * 4 * 32
    assert condify.applied_configs(model)[0].calibrated == "soft"
    routers = {k: v for k, v in snapshot(model).items() if ".router." in k or "expert_layout" in k}
    assert any(not torch.equal(v, before[k]) for k, v in routers.items() if ".router." in k)
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items() if k not in routers)  # frozen
    kl_soft = kl()
    res2 = condify.calibrate(
        model, batches, stage="hard", hard_steps=30, hold_target=False, progress=False, keep_if_better=False
    )  # the mechanism: trained on random data, kept as trained
    assert res2["hard_steps"] == 30 and kl() < kl_soft
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in routers.items())  # routers and thresholds kept
    assert condify.applied_configs(model)[0].calibrated == "hard"


def test_defaults_size_steps_from_data() -> None:
    model = tiny("llama")
    condify.modify(model, "lte", expert_size=8)
    res = condify.calibrate(model, data(6), target_sparsity=0.25, progress=False)
    # 6 batches, 1 held out: routers one pass; the hard fine-tune 4 passes (far below RECOVERY_TOKENS)
    assert res["soft_steps"] == 5 and res["hard_steps"] == 20 and res["passes"] == 4.0
    rates = [t[0] for t in res["hard_tried"]]  # the default rate and a third of it, each from the same start
    assert rates[:2] == pytest.approx([3e-4, 1e-4]) and res["hard_lr"] in (*rates, None)
    tried = len(rates)  # a hard stage that raised the held-out NLL beyond noise is tried again at lr / 10
    assert res["tokens"] == (5 + 20 * tried) * 4 * 32 and res["ratio"] is not None
    passes = res["hard_passes"]  # the last attempt's held-out NLL after each pass, and the pass kept
    assert len(passes["held_nll"]) == 4 and passes["kept"] == 1 + passes["held_nll"].index(
        min(passes["held_nll"])
    )
    assert abs(res["executed_fit"] - 0.75) < 0.05


def test_bad_inputs_leave_model_unchanged() -> None:
    model = tiny("llama", inter=96)
    before = snapshot(model)
    for t in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(condify.ConfigError, match="threshold"):
            condify.modify(model, "lte", threshold=t)
    with pytest.raises(condify.ConfigError, match=r"sizes that divide it: \[1, 2, 3, 4, 6, 8, 12"):
        condify.modify(model, "lte", expert_size=10)
    with pytest.raises(condify.ConfigError, match="init_bias.*dense at init"):
        condify.modify(model, "lte", threshold=0.9, init_bias=1.0)
    with pytest.raises(condify.ModifyError, match="modify"):
        condify.calibrate(model, data())
    assert same_state(snapshot(model), before) and condify.applied_configs(model) == []
    condify.modify(model, "lte", expert_size=8)
    after_modify = snapshot(model)
    cases = [
        (dict(stage="hard", target_sparsity=0.5), "never trained"),
        (dict(target_sparsity=0.95), "cannot be met.*one expert per token"),  # 12 experts: <= 0.917
        (dict(), "pass `target_sparsity`"),
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=0.5, stage="medium"), "stage"),
        (dict(target_sparsity=0.5, hard_params="x"), "hard_params"),
    ]
    for opts, match in cases:
        with pytest.raises(condify.ConfigError, match=match):
            condify.calibrate(model, data(), progress=False, **opts)
        assert same_state(snapshot(model), after_modify)
    with pytest.raises(condify.ConfigError, match="at least"):
        condify.calibrate(model, [ids(1, 8)] * 3, target_sparsity=0.5, progress=False)
    condify.calibrate(model, data(), target_sparsity=0.5, stage="soft", soft_steps=2, progress=False)
    trained = snapshot(model)
    with pytest.raises(condify.ConfigError, match="cannot be met by stage='hard'"):
        condify.calibrate(model, data(), stage="hard", target_sparsity=0.3, progress=False)
    assert same_state(snapshot(model), trained)
    with pytest.raises(condify.ModifyError, match="already"):
        condify.modify(model, "lte", expert_size=8)
    assert isinstance(condify.applied_configs(model)[0], LteConfig)


def test_recipes_and_registry() -> None:
    from condify import registry

    assert "lte" in condify.list_methods()
    spec = registry.get("lte")
    assert {"quick", "cpu", "long"} <= set(spec.recipes)
    for r in spec.recipes.values():
        LteConfig.from_options(**r.modify)
        LteCalibration.from_options(**r.calibrate)
    model = tiny("llama")
    condify.modify(model, "lte", expert_size=8, layers=[1])
    text = condify.describe(model)
    assert "lte" in text and "model.layers.1.mlp (+router, expert_layout): experts=8" in text


def test_hold_target_keeps_executed_during_fine_tune() -> None:
    model = tiny("llama", inter=128, layers=4)
    condify.modify(model, "lte", expert_size=8)
    batches = data(9)
    condify.calibrate(model, batches, target_sparsity=0.5, stage="soft", soft_steps=10, progress=False)
    tau = float(converted(model)[0][1].expert_layout.tau)
    res = condify.calibrate(model, batches, stage="hard", hard_steps=20, hard_lr=3e-3, progress=False)
    taus = {float(m.expert_layout.tau) for _, m in converted(model)}
    assert taus == {res["threshold_after_hard"]} and res["threshold_after_hard"] != tau  # one, moved
    assert abs(res["hard_executed"][1] - 0.5) < 0.1
