"""mot (Mixture of Tokens): mixing vs a naive loop, causality, batch-size errors, temperature limits,
the transitioned MoE vs a naive loop, generate/batch invariance, save/load and unmodify at every stage."""

from __future__ import annotations

import math

import pytest
import torch
from small import ids as small_ids
from small import logits, one_thread, same_state, small, snapshot  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

import condify
from condify.methods.mot import RECIPES, MoTCalibration, MoTConfig, set_temperature, stage
from condify.methods.mot.calibrate import grouped
from condify.methods.mot.modules import converted
from condify.methods.mot.transform import set_stage
from condify.ops.reference import ACTIVATIONS

KINDS = ["llama", "phi3", "gpt2"]


def tiny(kind: str = "llama", inter: int = 64) -> torch.nn.Module:
    return small(kind, inter)


def ids(b: int = 4, t: int = 9, seed: int = 1) -> torch.Tensor:
    return small_ids(b, t, seed)


def data(n: int = 6, b: int = 4) -> list[torch.Tensor]:
    return [ids(b, 16, seed=s) for s in range(n)]


def site(model: torch.nn.Module) -> torch.nn.Module:
    return converted(model)[0][1]


def expert(mlp: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a converted MLP on one vector: the dense MLP restricted to its neuron block."""
    st = mlp._condify_patch.state
    w = st.adapter.mlp_weights(mlp)
    lo, hi = e * st.expert_size, (e + 1) * st.expert_size
    up = w["up"][lo:hi] @ x + (0 if w["b_up"] is None else w["b_up"][lo:hi])
    act = ACTIVATIONS[st.activation]
    if w["gate"] is None:
        h = act(up)
    else:
        h = act(w["gate"][lo:hi] @ x + (0 if w["b_gate"] is None else w["b_gate"][lo:hi])) * up
    return w["down"][:, lo:hi] @ h


def bias(mlp: torch.nn.Module) -> torch.Tensor | float:
    b = mlp._condify_patch.state.adapter.mlp_weights(mlp)["b_down"]
    return 0.0 if b is None else b


@torch.no_grad()
def naive_mot(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Loop over groups (G consecutive sequences), positions and experts."""
    st = mlp._condify_patch.state
    G, E, t = st.group_size, st.experts, float(mlp.router.temperature)
    B, T, _ = x.shape
    out = torch.zeros(B, T, mlp._condify_patch.state.adapter.mlp_weights(mlp)["down"].shape[0])
    for g0 in range(0, B, G):
        for p in range(T):
            xs = x[g0 : g0 + G, p]  # the group: same position, G sequences
            for e in range(E):
                w = torch.softmax(xs @ mlp.router.weight[e] / t, dim=0)
                o = expert(mlp, e, (w[:, None] * xs).sum(0))
                for i in range(G):
                    out[g0 + i, p] += w[i] * o
    return out + bias(mlp)


@torch.no_grad()
def naive_moe(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens: the top-k experts of ``x . W_c``, outputs summed with weight 1."""
    st = mlp._condify_patch.state
    xf = x.reshape(-1, x.shape[-1])
    out = []
    for tok in xf:
        scores = mlp.router.weight @ tok
        top = scores.topk(st.top_k)
        out.append(sum(expert(mlp, int(e), tok) for e in top.indices))
    return (torch.stack(out) + bias(mlp)).reshape(*x.shape[:-1], -1)


def mlp_input(model: torch.nn.Module, b: int = 4, t: int = 5) -> torch.Tensor:
    d = model.config.hidden_size
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", KINDS)
def test_mot_layer_matches_naive_loop(kind: str) -> None:
    model = tiny(kind)
    condify.modify(model, "mot", group_size=2, num_experts=4, temperature=0.7, router_scale=2.0)
    mlp = site(model)
    x = mlp_input(model)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), naive_mot(mlp, x), atol=1e-5, rtol=1e-5)


def test_group_of_one_is_dense_and_clustering_keeps_function() -> None:
    model = tiny("llama")
    x = ids()
    dense = logits(model, x)
    condify.modify(model, "mot", group_size=1, num_experts=4)  # G = 1: every weight is 1
    torch.testing.assert_close(logits(model, x), dense, atol=1e-5, rtol=1e-5)
    perm = site(model).expert_layout.perm
    assert not torch.equal(perm, torch.arange(perm.numel()))  # k-means really permuted the neurons


def test_temperature_limit_is_one_token_per_expert() -> None:
    """t -> 0: each expert runs its group's highest-scoring token alone, which gets the full output."""
    model = tiny("llama")
    condify.modify(model, "mot", group_size=4, num_experts=4, router_scale=3.0)
    mlp = site(model)
    set_temperature(model, 1e-6)
    x = mlp_input(model, b=8, t=3)
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for g0 in range(0, 8, 4):
            for p in range(3):
                xs = x[g0 : g0 + 4, p]
                for e in range(4):
                    i = int((xs @ mlp.router.weight[e]).argmax())
                    ref[g0 + i, p] += expert(mlp, e, xs[i])
        torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)


def test_causal_and_groups_stay_apart() -> None:
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4)
    x = ids(4, 12)
    ref = logits(model, x)
    y = x.clone()
    y[:, 7:] = ids(4, 5, seed=9)  # change the future of every sequence
    out = logits(model, y)
    torch.testing.assert_close(out[:, :7], ref[:, :7], atol=1e-6, rtol=0)
    z = x.clone()
    z[2:] = ids(2, 12, seed=5)  # change the second group only: the first group is not affected
    torch.testing.assert_close(logits(model, z)[:2], ref[:2], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 7:], ref[:, 7:])


def test_a_batch_not_multiple_of_group_size_ends_in_a_smaller_group() -> None:
    """B % G sequences form the last group; a group of one mixes nothing (the dense MLP)."""
    model = tiny("llama")
    dense = logits(model, ids(3))
    condify.modify(model, "mot", group_size=2, num_experts=4)
    x = ids(3)
    out = logits(model, x)
    torch.testing.assert_close(out[:2], logits(model, x[:2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2:], logits(model, x[2:]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2:], dense[2:], atol=1e-5, rtol=1e-5)  # alone: every expert, weight 1


def test_calibrate_regroups_batches_of_one_into_full_groups() -> None:
    assert [
        b["input_ids"].shape[0] for b in grouped([{"input_ids": ids(1, 8, seed=s)} for s in range(7)], 2)
    ] == [2, 2, 2]
    parts = [{"input_ids": ids(3, 8, seed=s)} for s in range(2)]
    out = grouped(parts, 2)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), torch.cat([b["input_ids"] for b in parts]))
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4)
    before = snapshot(model)
    with pytest.raises(condify.ConfigError, match=r"not multiples of group_size=2 and cannot be regrouped"):
        condify.calibrate(model, [ids(1, 8), ids(1, 6), ids(2, 8)], holdout=0, steps=2, progress=False)
    assert same_state(snapshot(model), before) and stage(model) == "mot"
    res = condify.calibrate(model, data(b=1), steps=2, progress=False)  # batches of one: regrouped
    assert res["ratio"] is not None and math.isfinite(res["ratio"])


def test_bad_options() -> None:
    model = tiny("llama", inter=96)
    before = snapshot(model)
    with pytest.raises(condify.ConfigError, match=r"values that divide it: \[1, 2, 3, 4, 6, 8"):
        condify.modify(model, "mot", num_experts=5)
    with pytest.raises(condify.ConfigError, match="top_k"):
        condify.modify(model, "mot", num_experts=4, top_k=8)
    with pytest.raises(condify.ConfigError, match="temperature"):
        condify.modify(model, "mot", temperature=0.0)
    assert same_state(snapshot(model), before) and condify.applied_configs(model) == []
    condify.modify(model, "mot", num_experts=4)
    assert condify.applied_configs(model)[0].layers == [1]  # default: the second half of the blocks
    with pytest.raises(condify.ConfigError, match="stage"):
        condify.calibrate(model, data(), stage="sparse", progress=False)
    with pytest.raises(condify.ModifyError, match="already"):
        condify.modify(model, "mot")


def test_plain_training_loop_trains_experts_and_controller() -> None:
    """The converted model is an ordinary nn.Module: a hand-written AdamW loop on the LM loss."""
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4, layers=[0, 1])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(4, 16)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        assert site(model).router.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_calibrate_mot_anneals_temperature_then_transition() -> None:
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4, layers=[0, 1])
    r = condify.calibrate(model, data(), stage="mot", steps=4, temperature_end=0.1, progress=False)
    assert r["executed"] == pytest.approx(0.5) and len(r["losses"]) == 4
    assert all(t == pytest.approx(0.1) for t in r["temperature"].values())
    r = condify.calibrate(model, data(), stage="transition", steps=2, keep_if_better=False, progress=False)
    assert stage(model) == "moe" and condify.applied_configs(model)[0].stage == "moe"
    assert r["executed"] == pytest.approx(2 / 4) and r["mot_ppl"] > 0 and len(r["transition_losses"]) == 2
    with condify.track(model) as t:
        logits(model, ids(3))  # any batch size now
    assert t.fraction("mot", "mlp") == pytest.approx(0.5)
    with pytest.raises(condify.ConfigError, match="already transitioned"):
        condify.calibrate(model, data(), steps=1, progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_transitioned_moe_matches_naive_loop(kind: str) -> None:
    model = tiny(kind)
    condify.modify(model, "mot", group_size=2, num_experts=8, top_k=3, router_scale=2.0)
    set_stage(model, condify.applied_configs(model)[0], "moe")
    mlp = site(model)
    for b, t in ((1, 1), (3, 5)):
        x = mlp_input(model, b, t)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), naive_moe(mlp, x), atol=1e-5, rtol=1e-5)


def test_transitioned_moe_is_differentiable() -> None:
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4, top_k=2)
    set_stage(model, condify.applied_configs(model)[0], "moe")
    x = ids(3, 8)
    model(x, labels=x).loss.backward()
    mlp = site(model)
    assert mlp.router.weight.grad.abs().sum() > 0 and mlp.up_proj.weight.grad.abs().sum() > 0


def _transitioned(kind: str = "llama") -> torch.nn.Module:
    model = tiny(kind)
    condify.modify(model, "mot", group_size=2, num_experts=8, layers=[0, 1])
    condify.calibrate(model, data(), stage="full", steps=3, transition_steps=2, progress=False, holdout=0)
    assert stage(model) == "moe"
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_after_transition_generate_and_batch_invariance(kind: str) -> None:
    model = _transitioned(kind).eval()
    x = ids(3, 6)
    ref = logits(model, x)
    for i in range(3):  # batch invariance: each sequence alone gives its logits in the batch
        torch.testing.assert_close(logits(model, x[i : i + 1]), ref[i : i + 1], atol=1e-5, rtol=1e-5)
    for b in (1, 3):
        with torch.no_grad():
            gen = model.generate(x[:b], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            full = model.generate(x[:b], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
            assert torch.equal(gen, full)
            # recompute without cache: the logits of the generated text, step by step
            steps = logits(model, gen)[:, x.shape[1] - 1 : -1].argmax(-1)
            assert torch.equal(steps, gen[:, x.shape[1] :])


def test_mot_stage_generate_with_cache_at_group_multiple() -> None:
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4)
    x = ids(4, 6)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        full = model.generate(x, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(gen, full)


@pytest.mark.parametrize("when", ["mot", "moe"])
def test_save_load_exact_at_every_stage(tmp_path, when: str) -> None:
    if when == "mot":
        model = tiny("llama")
        condify.modify(model, "mot", group_size=2, num_experts=4, temperature=0.5)
        condify.calibrate(model, data(), stage="mot", steps=2, temperature_end=0.2, progress=False)
    else:
        model = _transitioned()
    x = ids(4)
    ref = logits(model, x)
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path).eval()
    assert stage(loaded) == when and condify.applied_configs(loaded) == condify.applied_configs(model)
    assert same_state(snapshot(loaded), snapshot(model))
    torch.testing.assert_close(logits(loaded, x), ref, atol=0, rtol=0)
    # a vanilla transformers load gives a working dense model (the neuron permutation keeps dense meaning)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    condify.unmodify(model)
    torch.testing.assert_close(logits(vanilla, x), logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_unmodify_exact_at_every_stage(kind: str) -> None:
    model = tiny(kind)
    before = snapshot(model)
    condify.modify(model, "mot", group_size=2, num_experts=4)
    condify.unmodify(model)
    assert same_state(snapshot(model), before)
    condify.modify(model, "mot", group_size=2, num_experts=4)
    set_stage(model, condify.applied_configs(model)[0], "moe")  # transition without training
    condify.unmodify(model)
    assert same_state(snapshot(model), before) and not hasattr(
        model.get_submodule("transformer.h.1.mlp" if kind == "gpt2" else "model.layers.1.mlp"), "router"
    )
    # after training: the unmodified model is the trained weights in the original neuron order
    model = _transitioned(kind)
    x = ids(4)
    mlp = site(model)
    w = {k: v.clone() for k, v in mlp._condify_patch.state.adapter.mlp_weights(mlp).items() if v is not None}
    perm = mlp.expert_layout.perm.clone()
    adapter = mlp._condify_patch.state.adapter
    condify.unmodify(model)
    assert set(snapshot(model)) == set(before)
    back = adapter.mlp_weights(mlp)
    assert torch.equal(back["up"][perm], w["up"]) and torch.equal(back["down"][:, perm], w["down"])
    assert all(p.is_contiguous() for p in mlp.parameters()) and logits(model, x).isfinite().all()


def test_recipes_are_valid_and_quick_ends_transitioned() -> None:
    for r in RECIPES.values():
        MoTConfig.from_options(**r.modify)
        opts = MoTCalibration.from_options(**r.calibrate)
        assert r.data.batch_size % r.modify.get("group_size", 4) == 0
        assert opts.stage == "full"  # every recipe ends in the batch-independent model
    q = RECIPES["quick"]
    model = tiny("llama")
    condify.modify(model, "mot", **q.modify)
    condify.calibrate(model, data(q.data.num_batches, q.data.batch_size), progress=False, **q.calibrate)
    assert stage(model) == "moe" and "mot" in condify.list_methods()


def test_failed_transition_leaves_the_mot_model(monkeypatch) -> None:
    """calibrate is transactional: an error after the switch to the MoE puts the MoT model back."""
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4)
    before, x = snapshot(model), ids(4)
    ref = logits(model, x)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("condify.run.train", boom)  # what Run.train calls
    with pytest.raises(RuntimeError, match="boom"):
        condify.calibrate(model, data(), stage="transition", steps=2, progress=False)
    assert stage(model) == "mot" and condify.applied_configs(model)[0].stage == "mot"
    assert same_state(snapshot(model), before)
    torch.testing.assert_close(logits(model, x), ref, atol=0, rtol=0)


def test_hf_trainer_trains_the_mot_model(tmp_path) -> None:
    """The HF Trainer (fused AdamW, its own loop) trains the MoT stage; batches are multiples of G."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4)
    w0 = site(model).router.weight.detach().clone()
    rows = [{"input_ids": r, "labels": r} for r in ids(8, 16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", dataloader_drop_last=True, use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert not torch.equal(site(model).router.weight.detach(), w0)
    assert logits(model.eval(), ids(4)).isfinite().all()


def test_default_calibrate_ends_transitioned_after_mot_and_recovery_passes() -> None:
    """``calibrate(model, data)`` alone: MoT for one pass over the (regrouped) fit batches, then the
    transitioned MoE for ``recovery_steps`` (4 passes of this little data) against the dense model, ending
    at its best held-out pass, kept only if it helps on held-out text."""
    model = tiny("llama")
    condify.modify(model, "mot", group_size=2, num_experts=4, layers=[0, 1])
    res = condify.calibrate(model, data(n=6, b=1) + data(n=6, b=1), holdout=[ids(2, 16)], progress=False)
    # 12 sequences -> 6 groups
    assert stage(model) == "moe" and res["steps"] == {"mot": 6, "transition": 24}
    assert len(res["losses"]) == 6 and len(res["transition_losses"]) in (0, 24)
    assert res["tokens"] in (6 * 2 * 16 + 24 * 2 * 16 * k for k in (1, 2))  # one that hurt: retried once
    assert math.isfinite(res["ratio"]) and len(res["transition_passes"]["held_nll"]) == 4


def test_transition_router_refit_ranks_experts_by_their_outputs() -> None:
    """``transition_router="regression"`` (default) refits each router to its experts' log output norms:
    on held-out tokens its top-k overlaps the top-k by true output norm more than the controller's does,
    and the switched model is closer to dense. ``"controller"`` keeps the MoT controller as the router."""
    held = ids(4, 16, seed=50)
    ref = logits(tiny("llama", inter=128), held)
    kl, overlap = {}, {}
    for how in ("controller", "regression"):
        model = tiny("llama", inter=128)
        condify.modify(model, "mot", group_size=2, num_experts=16, top_k=4, layers=[0, 1])
        mlp = site(model)
        controller = mlp.router.weight.clone()
        res = condify.calibrate(
            model, data(n=32), stage="transition", steps=0, transition_router=how, progress=False
        )
        assert torch.equal(mlp.router.weight, controller) == (how == "controller")
        assert ("router_r2" in res) == (how == "regression")
        xs: list[torch.Tensor] = []
        hook = mlp.register_forward_pre_hook(lambda m, a, xs=xs: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        out = logits(model, held)
        hook.remove()
        with torch.no_grad():
            chosen = mlp.router(xs[0]).topk(4, dim=-1).indices
            norms = torch.stack([torch.stack([expert(mlp, e, v).norm() for e in range(16)]) for v in xs[0]])
        best = norms.topk(4, dim=-1).indices
        overlap[how] = (
            sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(chosen, best, strict=True))
            / best.numel()
        )
        kl[how] = float((ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean())
    assert overlap["regression"] > overlap["controller"] + 0.05, overlap  # 4 of 16 at random: 0.25
    assert kl["regression"] < kl["controller"], kl
