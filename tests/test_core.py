"""The core API on every adapter architecture: modify/unmodify, save/load, errors before mutation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import CONFIGS, tiny
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

import condify

ARCHS = sorted(CONFIGS)


def snapshot(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, snap: tuple[str, dict[str, torch.Tensor]]) -> None:
    tree, sd = snap
    assert repr(model) == tree
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert not hasattr(model.config, "condify")


@pytest.mark.parametrize("arch", ARCHS)
def test_modify_unmodify_exact(arch):
    model = tiny(arch)
    ids = torch.randint(0, 128, (2, 9))
    dense = model(ids).logits
    snap = snapshot(model)
    condify.modify(model, "layer-parallel", pairs=2, start=1)
    assert not torch.allclose(model(ids).logits, dense)
    condify.unmodify(model)
    assert torch.equal(model(ids).logits, dense)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(arch, tmp_path):
    model = tiny(arch)
    ids = torch.randint(0, 128, (2, 9))
    dense = model(ids).logits
    condify.modify(model, "layer-parallel", pairs=1, start=2)
    out = model(ids).logits
    condify.save_pretrained(model, tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["condify"]["methods"][0]["method"]
        == "layer-parallel"
    )
    loaded = condify.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, out)
    assert condify.applied_configs(loaded) == condify.applied_configs(model)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # a working dense model
    assert torch.allclose(vanilla(ids).logits, dense, atol=1e-6)


def test_methods_and_describe():
    names = condify.list_methods()
    assert "layer-parallel" in names and all(isinstance(v, str) and v for v in names.values())
    model = tiny("llama")
    assert "dense" in condify.describe(model)
    condify.modify(model, "layer-parallel", pairs=1, start=1)
    text = condify.describe(model)
    assert "layer-parallel" in text and "model.layers.1" in text and "model.layers.2" in text


def test_config_object_and_options_equivalent():
    from condify.methods.layer_parallel import LayerParallelConfig

    a, b = tiny("llama"), tiny("llama")
    condify.modify(a, LayerParallelConfig(pairs=1, start=3))
    condify.modify(b, "layer-parallel", layers=[3, 4])
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("no-such-method", {}, "unknown method 'no-such-method'; known methods"),
        ("layer-parallel", {"pairs": 0}, "`pairs` must be an integer >= 1"),
        ("layer-parallel", {"pairs": 4}, "do not fit in a model with 6 layers"),
        ("layer-parallel", {"pairs": 1, "start": 5}, "do not fit"),
        ("layer-parallel", {"layers": [1, 2, 4]}, "pairs of adjacent layers"),
        ("layer-parallel", {"layers": [8, 9]}, "do not fit"),
        ("layer-parallel", {"bogus": 1}, "unknown options \\['bogus'\\]"),
    ],
)
def test_bad_input_leaves_model_unchanged(method, options, match):
    model = tiny("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        condify.modify(model, method, **options)
    assert_unchanged(model, snap)


def test_modify_twice_and_overlap_refused():
    model = tiny("llama")
    condify.modify(model, "layer-parallel", pairs=1, start=1)
    snap = repr(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(condify.ModifyError, match="already modified with 'layer-parallel'"):
        condify.modify(model, "layer-parallel", pairs=1, start=3)
    assert repr(model) == snap[0]
    assert condify.applied_configs(model)[0].start == 1


def test_unsupported_model():
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    model = BertForMaskedLM(cfg)
    snap = repr(model)
    with pytest.raises(condify.UnsupportedModelError, match="Supported model types: \\[.*'llama'"):
        condify.modify(model, "layer-parallel", pairs=1)
    assert repr(model) == snap


def test_unmodify_and_calibrate_need_a_modified_model():
    model = tiny("llama")
    with pytest.raises(condify.ModifyError, match="not modified"):
        condify.unmodify(model)
    with pytest.raises(condify.ModifyError, match="call condify.modify"):
        condify.calibrate(model, [torch.randint(0, 128, (1, 8))])


def test_checkpoint_config_and_weights_disagree(tmp_path):
    model = tiny("llama")
    condify.modify(model, "layer-parallel", pairs=1, start=1)
    condify.save_pretrained(model, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.1.router.weight"] = torch.zeros(3)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(condify.CheckpointError, match="does not match the saved weights.*router"):
        condify.from_pretrained(tmp_path)


def test_checkpoint_config_invalid(tmp_path):
    model = tiny("llama")
    condify.modify(model, "layer-parallel", pairs=1, start=1)
    condify.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["condify"]["methods"][0]["pairs"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(condify.ConfigError, match="do not fit"):
        condify.from_pretrained(tmp_path)


def test_import_is_light():
    code = (
        "import sys, condify, torch; condify.list_methods(); "
        "kernels = [m for m in sys.modules if m.startswith('condify.ops.triton')]; "
        "assert not kernels, f'kernel modules imported eagerly: {kernels}'; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_methods_compose_on_disjoint_layers_and_refuse_overlap(tmp_path):
    model = tiny("llama", num_hidden_layers=8)
    ids = torch.randint(0, 128, (2, 9))
    dense = model(ids).logits
    snap = snapshot(model)
    condify.modify(model, "layer-parallel", pairs=1, start=5)
    condify.modify(model, "mod-threshold", layers=[1, 3])
    before = repr(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(condify.ModifyError, match="overlaps"):
        condify.modify(model, "dynamic-k", layers=[5], expert_size=8)  # MLP inside a paired layer
    assert repr(model) == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())
    condify.modify(model, "dynamic-k", layers=[2], expert_size=8)
    assert [c.method for c in condify.applied_configs(model)] == [
        "layer-parallel",
        "mod-threshold",
        "dynamic-k",
    ]
    out = model(ids).logits
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, out)
    condify.unmodify(model, "mod-threshold")
    assert [c.method for c in condify.applied_configs(model)] == ["layer-parallel", "dynamic-k"]
    condify.unmodify(model)
    assert torch.equal(model(ids).logits, dense)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    ("method", "budget", "entry"),
    [
        ("dynamic-k", {"target_sparsity": 0.5, "router_steps": 20}, "adapt_loss"),
        ("mod-threshold", {"capacity": 0.75}, "keep_rates_holdout"),
        ("layer-parallel", {"pairs": 1}, "finetune_tokens"),
    ],
)
def test_defaults_run_the_stages_that_win_quality_back_and_report_held_out(method, budget, entry):
    """``calibrate(model, data, <budget>)`` alone fine-tunes (passes over the fit batches sized to the data:
    ``recovery_steps``) and reports held-out quality on batches it did not train on."""
    model = tiny("llama")
    condify.modify(model, method)
    batches = [torch.randint(0, 128, (2, 32)) for _ in range(10)]
    res = condify.calibrate(model, batches, progress=False, **budget)
    assert entry in res
    one_pass = 9 * 2 * 32  # the 9 fit batches; the 10th is held out
    passes = 8 if method == "mod-threshold" else 4  # 576 tokens a pass: the most passes (TRAIN_MAX_PASSES)
    assert res["tokens"] in (passes * one_pass, 2 * passes * one_pass)  # one that hurt: retried once
    assert (
        res["dense_ppl"] > 0
        and res["ppl"] > 0
        and res["ratio"] == pytest.approx(res["ppl"] / res["dense_ppl"])
    )
    assert res["seconds"] > 0


def test_recovery_steps_are_whole_passes_sized_to_the_data():
    """Enough passes for RECOVERY_TOKENS tokens, at least one, at most RECOVERY_MAX_PASSES."""
    from condify.training import RECOVERY_MAX_PASSES, RECOVERY_TOKENS, recovery_steps

    def data(n: int, seq: int, pad: int = 0) -> list[dict[str, torch.Tensor]]:
        mask = torch.ones(1, seq, dtype=torch.long)
        mask[:, :pad] = 0
        return [{"input_ids": torch.zeros(1, seq, dtype=torch.long), "attention_mask": mask}] * n

    assert RECOVERY_TOKENS == 32768 and RECOVERY_MAX_PASSES == 4
    assert recovery_steps(data(14, 512)) == 4 * 14  # 7k tokens a pass: capped at 4 passes
    assert recovery_steps(data(24, 512)) == 3 * 24  # 12k: 3 passes reach 32k
    assert recovery_steps(data(64, 512)) == 64  # 32k: one pass
    assert recovery_steps(data(100, 512)) == 100  # never less than one pass
    assert recovery_steps(data(24, 512, pad=256)) == 4 * 24  # padding is not counted: 6k a pass
    assert recovery_steps([]) == 0


def test_best_pass_ends_at_the_pass_that_scored_best_on_the_hold_out():
    """Run.train(best_pass=True) measures the held-out NLL after every pass and puts back the best pass's
    state; without it (or with the guard off) the model ends where the last step left it."""
    from condify.run import Run, state_copy
    from condify.training import distill_loss

    lm = distill_loss(None)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run_passes(best_pass: bool, guard: bool = True) -> tuple[Run, list[float]]:
        model = tiny("llama")
        run = Run(model, [{"input_ids": b} for b in batches[:3]], [{"input_ids": batches[3]}], guard=guard,
                  progress=False)  # fmt: skip
        held = run.held[0]

        def loss(m: nn.Module, b: dict, step: int) -> torch.Tensor:  # pass 1 helps the hold-out, 2-3 hurt it
            return (1.0 if step < 3 else -1.0) * lm(m, held, step)

        nlls: list[float] = []
        run.train(list(model.parameters()), 9, loss, lr=3e-3, warmup=0, best_pass=best_pass,
                  after_step=lambda step, _: nlls.append(run.held_nll()) if step % 3 == 2 else None)  # fmt: skip
        return run, nlls

    run, nlls = run_passes(best_pass=True)
    rec = run.passes["train"]
    assert rec["held_nll"] == pytest.approx(nlls) and rec["kept"] == 1.0  # the caller's after_step still runs
    assert nlls[0] < min(nlls[1:]) and run.held_nll() == pytest.approx(nlls[0])
    kept = state_copy(run.model)
    for best_pass, guard in ((False, True), (True, False)):
        other, nlls = run_passes(best_pass, guard)
        assert "train" not in other.passes and other.held_nll() == pytest.approx(nlls[-1])
        assert nlls[-1] > run.held_nll()
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in kept.items())


def test_best_pass_stops_after_passes_that_do_not_beat_the_best():
    """Five passes asked with patience 2, pass 1 the best and every later one worse: training stops after
    pass 3, keeps pass 1 and counts only the tokens it trained on; without patience all five run."""
    from condify.run import Run
    from condify.training import distill_loss

    lm = distill_loss(None)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model = tiny("llama")
    run = Run(model, [{"input_ids": b} for b in batches[:3]], [{"input_ids": batches[3]}], progress=False)
    held = run.held[0]

    def loss(
        m: nn.Module, b: dict, step: int
    ) -> torch.Tensor:  # pass 1 helps the hold-out, later passes hurt
        return (1.0 if step < 3 else -1.0) * lm(m, held, step)

    losses = run.train(list(model.parameters()), 15, loss, lr=3e-3, warmup=0, best_pass=True, patience=2)
    rec = run.passes["train"]
    assert rec["stopped"] == 3 and len(rec["held_nll"]) == 3
    assert len(losses) == 9 and run.tokens == 32 * len(losses)
    assert rec["kept"] == 1.0 and run.held_nll() == pytest.approx(rec["held_nll"][0])
    run.train(list(model.parameters()), 15, loss, lr=3e-3, warmup=0, best_pass=True)
    assert run.passes["train"]["stopped"] is None and len(run.passes["train"]["held_nll"]) == 5


def test_calibrate_warns_when_held_out_quality_is_poor():
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked predictions, and MLPs that dominate the residual stream:
        for layer in model.model.layers:  # a routing error shows in the perplexity
            layer.mlp.down_proj.weight.mul_(20)
    condify.modify(model, "dynamic-k", expert_size=16)
    batches = [torch.randint(0, 128, (2, 32)) for _ in range(6)]
    with pytest.warns(condify.QualityWarning, match="worse than dense"):  # random routers, 90 % skipped
        res = condify.calibrate(
            model, batches, router_steps=0, target_sparsity=0.9, adapt_steps=0, progress=False
        )
    assert res["ratio"] > 1.5 and res["ratio_high"] >= res["ratio"]
    assert res["ratio"] == pytest.approx(res["ppl"] / res["dense_ppl"])


@pytest.mark.parametrize("tokens, warned", [(64, True), (20_000, False)])
def test_quality_warning_allows_for_a_small_hold_out(tokens: int, warned: bool):
    """x1.42 on the hold-out is under the x1.5 bar, but on 64 tokens it is not told apart from x1.5: warn."""
    from condify import _quality, _report

    change = torch.randn(tokens, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    change = (change - change.mean()) / change.std() + math.log(1.42)  # mean log 1.42, one nat spread
    dense = torch.full((tokens,), 3.0, dtype=torch.float64)
    q = _quality(dense, dense + change)
    assert q["ratio"] == pytest.approx(1.42) and q["dense_ppl"] == pytest.approx(math.exp(3.0))
    assert q["ratio_high"] == pytest.approx(1.42 * math.exp(2 / math.sqrt(tokens)))
    result = {"method": "dynamic-k", "executed": 0.5, **q}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _report(result, 1, tokens)
    messages = [str(w.message) for w in caught if w.category is condify.QualityWarning]
    assert len(messages) == warned
    assert not warned or ("within the hold-out's noise" in messages[0] and "holdout=" in messages[0])


def test_keep_if_better_undoes_a_fine_tune_that_hurts_held_out_quality():
    """Run.keep_if_better keeps an attempt that lowers the held-out NLL; one that raises it is undone to the
    bit (every tensor of the state) and retried at a smaller rate; when none helps the model is as it was."""
    from condify.run import Run
    from condify.training import distill_loss, mean_nll

    model = tiny("llama")
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]  # fmt: skip
    run = Run(model, batches[:3], batches[3:], progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.model.layers[0].parameters())
    lrs: list[float] = []

    def wreck(lr: float) -> str:  # an "update" that always hurts: peaked random predictions
        lrs.append(lr)
        with torch.no_grad():
            model.lm_head.weight.mul_(30)
            params[0].add_(1.0)
        return "done"

    with pytest.warns(UserWarning, match="undone"):
        out, info = run.keep_if_better(wreck, 1e-3, "wreck")
    assert out is None and info["lr"] is None and lrs == pytest.approx([1e-3, 1e-4])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    calls: list[int] = []

    def fallback() -> None:  # the model without the stage (e.g. mod-threshold's refitted biases)
        calls.append(1)
        with torch.no_grad():
            model.model.norm.weight.mul_(0.5)

    with pytest.warns(UserWarning, match="undone"):
        run.keep_if_better(wreck, 1e-3, "wreck", fallback=fallback)
    assert len(calls) == 2  # once to measure the bar, once to leave the model there
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"] * 0.5)
    with torch.no_grad():
        model.model.norm.weight.copy_(before["model.norm.weight"])

    nll = mean_nll(model, batches[3:])
    out, info = run.keep_if_better(  # the held-out batch itself: training on it must lower its NLL
        lambda lr: run.train(params, 5, distill_loss(None), lr=lr, batches=batches[3:]), 1e-2, "fit"
    )
    assert out is not None and info["lr"] == pytest.approx(1e-2) and info["held_nll"][1] < nll


@pytest.mark.parametrize("best", [0, 1, 2])
def test_keep_if_better_chooses_the_rate_that_scores_best_on_the_hold_out(best: int):
    """A tuple of factors is a choice: every rate runs from the same start and the model ends bit-equal to
    the best one run alone (whichever position it has); each rate is in ``tried``; no hold-out: the first."""
    from condify.run import Run, state_copy

    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]  # fmt: skip
    factors = (1.0, 0.5, 0.25)

    def step(model: nn.Module, lr: float) -> float:  # peaked predictions (worse) except at factors[best]
        with torch.no_grad():
            model.lm_head.weight.mul_(1 + 20 * abs(lr - factors[best]))
            model.model.norm.weight.add_(1e-4 * lr)  # every rate leaves its own state
        return lr

    def alone(lr: float) -> dict[str, torch.Tensor]:
        model = tiny("llama")
        step(model, lr)
        return state_copy(model)

    model = tiny("llama")
    run = Run(model, batches[:3], batches[3:], progress=False)
    out, info = run.keep_if_better(lambda lr: step(model, lr), 1.0, "choose", factors=(factors, 0.1))
    assert out == info["lr"] == factors[best] and [t[0] for t in info["tried"]] == list(factors)
    assert min(t[1] for t in info["tried"]) == info["held_nll"][1]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in alone(factors[best]).items())
    free = tiny("llama")
    out, info = Run(free, batches, [], progress=False).keep_if_better(
        lambda lr: step(free, lr), 1.0, "choose", factors=(factors,)
    )
    assert out == 1.0 and info["tried"] == []


def test_keep_if_better_keeps_a_held_out_rise_within_noise_and_undoes_one_beyond_it():
    """The guard's bar is the paired standard error of the per-token NLL change: a small mean rise with
    large per-token swings is noise (kept); a uniform rise of the same size is not (undone)."""
    from condify.run import GUARD_SE, Run, paired_change

    before = torch.full((200,), 3.0, dtype=torch.float64)
    swings = torch.tensor([1.0, -1.0] * 100, dtype=torch.float64)
    rise, se = paired_change(before, before + swings + 0.02)
    assert rise == pytest.approx(0.02) and se == pytest.approx(swings.std().item() / 200**0.5)
    assert rise <= GUARD_SE * se
    rise, se = paired_change(before, before + 0.02)
    assert rise == pytest.approx(0.02) and se == pytest.approx(0.0, abs=1e-12) and rise > GUARD_SE * se

    model = tiny("llama")
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    run = Run(model, batches[:3], batches[3:], progress=False)
    assert run.held_nlls().numel() == 2 * 15 and run.held_nll() == pytest.approx(
        float(run.held_nlls().mean())
    )
    head = model.lm_head.weight.detach().clone()

    def jitter(seed: int):  # large per-token swings, a small mean change
        def attempt(lr: float) -> None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                model.lm_head.weight.add_(0.3 * head.std() * torch.randn(head.shape, generator=g))

        return attempt

    before = run.held_nlls()
    for seed in range(50):  # a jitter that raises the held-out NLL, but by less than one standard error
        jitter(seed)(1.0)
        rise, se = paired_change(before, run.held_nlls())
        with torch.no_grad():
            model.lm_head.weight.copy_(head)
        if 0 < rise <= GUARD_SE * se:
            break
    assert 0 < rise <= GUARD_SE * se
    out, info = run.keep_if_better(jitter(seed), 1.0, "jitter", factors=(1.0,))
    assert info["lr"] == 1.0 and info["tried"][0][1:] == pytest.approx((float(before.mean()) + rise, se))
    assert not torch.equal(model.lm_head.weight, head)  # kept
    with torch.no_grad():
        model.lm_head.weight.copy_(head)

    def sharpen(lr: float) -> None:  # peaked random predictions: a rise far outside the noise
        with torch.no_grad():
            model.lm_head.weight.mul_(30)

    with pytest.warns(UserWarning, match="beyond noise"):
        _, info = run.keep_if_better(sharpen, 1.0, "sharpen", factors=(1.0,))
    assert info["lr"] is None and torch.equal(model.lm_head.weight, head)


def test_kl_loss_in_chunks_equals_the_whole_batch_in_value_and_gradient(monkeypatch) -> None:
    """kl_loss splits large-vocabulary logits into checkpointed chunks: same loss, same gradient."""
    from condify import training

    torch.manual_seed(0)
    student = (3 * torch.randn(3, 7, 50)).requires_grad_()
    teacher = 3 * torch.randn(3, 7, 50)
    batch = {"attention_mask": torch.tensor([[1] * 7, [0, 0] + [1] * 5, [1] * 6 + [0]])}

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        student.grad = None
        loss = training.kl_loss(student, teacher, batch, temperature=2.0)
        loss.backward()
        return loss.detach(), student.grad.clone()

    whole = loss_and_grad()  # 21 x 50 entries: one chunk
    p = torch.log_softmax(teacher / 2, -1)
    ref = (p.exp() * (p - torch.log_softmax(student.detach() / 2, -1))).sum(-1)
    m = batch["attention_mask"].float()
    torch.testing.assert_close(whole[0], (ref * m).sum() / m.sum() * 4)
    monkeypatch.setattr(training, "KL_CHUNK_ABOVE", 100)
    monkeypatch.setattr(training, "KL_CHUNK_ELEMENTS", 4 * 50)  # chunks of 4 positions (the last of 1)
    chunked = loss_and_grad()
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_rates_scaled_to_the_weights_give_the_same_relative_step_at_any_weight_size() -> None:
    """lr_scale="weights": a model whose matrices are 10x smaller (and whose forward undoes that, so it
    computes the same function) takes 10x smaller steps, the same relative change as the original;
    parameters condify added (routers) keep the rate as given; "none" moves both by the same amount."""
    from condify.training import LR_REFERENCE_RMS, scale_to_weights, train

    class Net(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.scale = scale
            self.lin = nn.Linear(8, 4)
            with torch.no_grad():
                self.lin.weight.mul_(scale)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.lin.weight / self.scale, self.lin.bias)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))

    def loss(m: nn.Module, b: dict, _: int) -> torch.Tensor:
        return (m(b["x"]) - 1).pow(2).mean()

    def relative_step(scale: float, lr_scale: str) -> torch.Tensor:
        net = Net(scale)
        w0 = net.lin.weight.detach().clone()
        train(net, list(net.parameters()), [{"x": x}], 3, loss, lr=1e-2, warmup=0, lr_scale=lr_scale,
              max_grad_norm=0, progress=False)  # fmt: skip
        return (net.lin.weight.detach() - w0) / w0

    torch.testing.assert_close(
        relative_step(0.1, "weights"), relative_step(1.0, "weights"), rtol=1e-4, atol=1e-6
    )
    assert (relative_step(0.1, "none").abs() / relative_step(1.0, "none").abs()).median() > 5

    model = tiny("llama")
    condify.modify(model, "dynamic-k")
    mlp = model.model.layers[0].mlp
    groups = scale_to_weights(model, [{"params": list(mlp.parameters()), "lr": 1e-3}])
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    w = mlp.up_proj.weight
    assert lr_of[id(w)] == pytest.approx(1e-3 * float(w.detach().pow(2).mean().sqrt()) / LR_REFERENCE_RMS)
    assert all(lr_of[id(p)] == 1e-3 for p in mlp.router.parameters())
    with pytest.raises(condify.ConfigError, match="adapt_lr_scale"):
        condify.calibrate(model, [torch.randint(0, 128, (1, 16)) for _ in range(4)], adapt_lr_scale="adam")


def test_bf16_training_steps_fp32_masters() -> None:
    """A bf16 model's fine-tune follows the fp32 one: AdamW's small steps (lr 3e-5 on weights of RMS
    0.02) are taken on fp32 copies and written back rounded. Stepping the bf16 weights themselves loses
    most updates (relative error of the update vs fp32: 0.85, against 0.20 with the copies)."""
    import copy

    from condify.training import lm_loss, train

    m32 = tiny("llama")
    with torch.no_grad():
        for p in m32.parameters():
            if p.dim() == 2:
                p.mul_(0.02 / p.pow(2).mean().sqrt())
            p.copy_(p.to(torch.bfloat16).float())  # both start from the same (representable) weights
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=gen)} for _ in range(4)]
    steps = []
    for m in (m32, m16):
        ps = [p for n, p in m.named_parameters() if ".mlp." in n]
        before = [p.detach().float().clone() for p in ps]
        train(m, ps, batches, 20, lambda mm, b, _: lm_loss(mm(**b).logits, b), lr=3e-5, progress=False)
        assert all(p.dtype == m.dtype for p in ps)
        steps.append(torch.cat([(p.detach().float() - q).flatten() for p, q in zip(ps, before, strict=True)]))
    d32, d16 = steps
    assert float((d16 - d32).norm() / d32.norm()) < 0.4
