"""Tests for condify.evaluate and condify.report on a tiny random Llama (built offline)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from condify import evaluate as ev
from condify.report import Report, format_value

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS


def tiny_llama(attn: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return tiny_llama()


# --------------------------------------------------------------------------- perplexity


def test_perplexity_equals_exp_of_model_loss(model):
    ids = torch.randint(2, VOCAB, (3, 17))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert ev.perplexity(model, [ids], progress=False) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    # token-weighted over batches: splitting the batch changes nothing
    split = [ids[:1], ids[1:]]
    assert ev.perplexity(model, split, progress=False) == pytest.approx(math.exp(loss.item()), rel=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_perplexity_ignores_padding(model, side):
    a, b = torch.randint(2, VOCAB, (1, 12)), torch.randint(2, VOCAB, (1, 7))
    nll = sum(math.log(ev.perplexity(model, [x], progress=False)) * (x.shape[1] - 1) for x in (a, b))
    expected = math.exp(nll / (11 + 6))
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded_b = torch.cat([pad, b] if side == "left" else [b, pad], dim=1)
    mask_b = torch.cat([pad, torch.ones_like(b)] if side == "left" else [torch.ones_like(b), pad], dim=1)
    batch = {"input_ids": torch.cat([a, padded_b]), "attention_mask": torch.cat([torch.ones_like(a), mask_b])}
    assert ev.perplexity(model, [batch], progress=False) == pytest.approx(expected, rel=1e-4)


def test_perplexity_restores_training_mode_and_validates(model):
    model.train()
    try:
        ev.perplexity(model, [torch.randint(0, VOCAB, (1, 8))], progress=False)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="at least one batch"):
        ev.perplexity(model, [], progress=False)
    with pytest.raises(ValueError, match="2-D"):
        ev.perplexity(model, [torch.randint(0, VOCAB, (8,))], progress=False)


# --------------------------------------------------------------------------- FLOPs


def hand_count(b: int, s: int) -> dict[str, float]:
    t = b * s
    q_o = 2 * (2 * t * HIDDEN * HEADS * HEAD_DIM)
    k_v = 2 * (2 * t * HIDDEN * KV_HEADS * HEAD_DIM)
    scores = 2 * (2 * b * HEADS * s * s * HEAD_DIM)  # QK^T and PV, full s x s (no causal discount)
    mlp = 3 * 2 * t * HIDDEN * INTER
    lm_head = 2 * t * HIDDEN * VOCAB
    att = LAYERS * (q_o + k_v + scores)
    return {
        "attention": att,
        "mlp": LAYERS * mlp,
        "lm_head": lm_head,
        "other": 0,
        "total": att + LAYERS * mlp + lm_head,
    }


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_executed_flops_matches_hand_count(attn):
    m = tiny_llama(attn)
    ids = torch.randint(0, VOCAB, (2, 11))
    assert ev.executed_flops(m, ids) == pytest.approx(hand_count(2, 11))


class HalfTokenMLP(nn.Module):
    """Runs the wrapped MLP on the first half of the tokens only; the rest get a zero update."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x.shape[1] // 2
        out = torch.zeros_like(x)
        out[:, :keep] = self.inner(x[:, :keep])
        return out


def test_flops_drop_when_mlp_skips_tokens(model):
    ids = torch.randint(0, VOCAB, (2, 16))
    sparse = copy.deepcopy(model)
    for layer in sparse.model.layers:
        layer.mlp = HalfTokenMLP(layer.mlp)
    dense_flops = ev.executed_flops(model, ids)
    sparse_flops = ev.executed_flops(sparse, ids)
    assert sparse_flops["mlp"] == pytest.approx(dense_flops["mlp"] / 2)
    assert sparse_flops["attention"] == dense_flops["attention"]
    ratio = ev.flops_ratio(sparse, model, ids)
    assert ratio["mlp"] == pytest.approx(0.5)
    assert ratio["attention"] == pytest.approx(1.0) and ratio["lm_head"] == pytest.approx(1.0)
    assert 0.5 < ratio["total"] < 1.0
    assert math.isnan(ratio["other"])  # dense "other" is 0


def test_flops_of_unmatched_modules_are_other(model):
    class WithRouter(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer
            self.router = nn.Linear(HIDDEN, 1)

        def forward(self, hidden_states, *args, **kwargs):
            self.router(hidden_states)
            return self.layer(hidden_states, *args, **kwargs)

    routed = copy.deepcopy(model)
    routed.model.layers[0] = WithRouter(routed.model.layers[0])
    ids = torch.randint(0, VOCAB, (1, 9))
    flops = ev.executed_flops(routed, ids)
    assert flops["other"] == pytest.approx(2 * 9 * HIDDEN * 1)
    assert flops["attention"] == pytest.approx(hand_count(1, 9)["attention"])


# --------------------------------------------------------------------------- KV cache


def test_kv_cache_bytes_after_prefill_is_analytic(model):
    from transformers import DynamicCache

    b, s = 3, 13
    ids = torch.randint(0, VOCAB, (b, s))
    analytic = LAYERS * 2 * b * KV_HEADS * s * HEAD_DIM * 4  # K and V, fp32
    with torch.no_grad():
        cache = ev.output_cache(model(ids, use_cache=True))
    assert isinstance(cache, DynamicCache)
    assert ev.output_cache({"logits": None}) is None
    assert ev.kv_cache_bytes(cache) == analytic
    assert ev.prefill_kv_bytes(model, ids) == analytic
    legacy = [(layer.keys, layer.values) for layer in cache.layers]
    assert ev.kv_cache_bytes(legacy) == analytic
    assert ev.kv_cache_bytes(None) == 0


def test_kv_cache_bytes_prefers_condify_nbytes():
    class Ragged:
        layers = ()

        def condify_nbytes(self) -> int:
            return 1234

    assert ev.kv_cache_bytes(Ragged()) == 1234
    with pytest.raises(TypeError, match="don't know"):
        ev.kv_cache_bytes(object())


# --------------------------------------------------------------------------- timing


def test_timers_positive_and_validated(model):
    ids = torch.randint(2, VOCAB, (1, 8))
    assert ev.time_prefill(model, ids, repeats=2, warmup=0) > 0
    assert ev.time_decode(model, ids, new_tokens=3, repeats=1, warmup=0) > 0
    with pytest.raises(ValueError, match="new_tokens"):
        ev.time_decode(model, ids, new_tokens=1)
    with pytest.raises(ValueError, match="repeats"):
        ev.time_prefill(model, ids, repeats=0)


def test_compare_speed_keys_and_ratios(model):
    ids = torch.randint(2, VOCAB, (2, 8))
    model.train()
    result = ev.compare_speed({"dense": model, "same": model}, ids, new_tokens=3, repeats=2, warmup=0)
    assert model.training  # mode restored
    model.eval()
    assert set(result) == {"dense", "same"}
    keys = {"prefill_s", "decode_tok_s", "kv_bytes", "peak_bytes", "param_bytes"}
    keys |= {"prefill_speedup", "decode_speedup", "kv_ratio", "peak_ratio"}
    for row in result.values():
        assert set(row) == keys
        assert all(v > 0 for v in row.values())
    assert result["dense"]["prefill_speedup"] == 1.0 and result["dense"]["decode_speedup"] == 1.0
    # generate(3) caches prompt + 2 generated tokens
    assert result["same"]["kv_bytes"] == LAYERS * 2 * 2 * KV_HEADS * (8 + 2) * HEAD_DIM * 4
    assert result["same"]["kv_ratio"] == 1.0
    with pytest.raises(ValueError, match="baseline"):
        ev.compare_speed({"other": model}, ids)


def test_environment_and_threads():
    old = ev.set_threads(1)
    try:
        assert torch.get_num_threads() == 1
        env = ev.environment()
        assert env["torch_threads"] == "1"
        assert env["torch"] == torch.__version__
        assert env["device"] and env["cpu"]
    finally:
        ev.set_threads(old)
    with pytest.raises(ValueError):
        ev.set_threads(0)


# --------------------------------------------------------------------------- report


def test_report_writes_markdown_and_pngs(tmp_path):
    rep = Report("demo", env={"torch": "x", "threads": "2"})
    rep.add_text("Some *text*.")
    rep.add_table(["method", "ppl ratio", "flops"], [["dense", 1.0, 12345678.0], ["a|b", 1.23456, 0.5]])
    rep.plot_bars("bars", ["dense", "sparse"], [1.0, 1.4], ylabel="speedup", reference=1.0)
    rep.plot_lines("lines", [0.25, 0.5, 1.0], {"m1": [3, 2, 1], "m2": [1, 2, 3]}, xlabel="capacity")
    rep.add_plot("custom", lambda ax: ax.plot([0, 1], [0, 1]))
    path = rep.write(tmp_path / "out")
    text = path.read_text()
    assert path.name == "report.md"
    assert text.startswith("# demo\n")
    assert "## Environment" in text and "| threads | 2 |" in text
    assert "| dense | 1 | 1.235e+07 |" in text and "| a\\|b | 1.235 | 0.5 |" in text
    for name in ("bars", "lines", "custom"):
        assert f"({name}.png)" in text
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="cells"):
        rep.add_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="already exists"):
        rep.plot_bars("bars", ["x"], [1.0])
    assert format_value(float("nan")) == "nan" and format_value(3) == "3"


def test_report_default_environment():
    text = Report("env").to_markdown()
    assert torch.__version__ in text and "torch_threads" in text


def test_flops_count_the_path_expert_methods_run_without_the_counter(model):
    """FlopCounterMode's module tracker registers global hooks; condify declares them observers, so the
    expert MLPs keep their fast path under the counter (executed < dense) and a real global hook, which
    must see every projection call, still turns it off."""
    import condify
    from condify.hooks import global_hooks, observing

    ids = torch.randint(0, VOCAB, (2, 16))
    sparse = copy.deepcopy(model)
    condify.modify(sparse, "dynamic-k", expert_size=8, tau=0.9)
    ratio = ev.flops_ratio(sparse, model, ids)
    assert ratio["mlp"] < 0.9  # tau 0.9 runs few experts; dense + router would be > 1
    assert not global_hooks()
    seen: list[nn.Module] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(m))
    try:
        assert global_hooks()
        with observing(contextlib.nullcontext()):  # registers nothing: the user's hook is not an observer
            assert global_hooks()
        with torch.no_grad():
            sparse(ids)
        assert any(m is sparse.model.layers[0].mlp.up_proj for m in seen)  # called as a module: hook saw it
    finally:
        handle.remove()
    assert not global_hooks()
