"""mod-threshold: dense at init, masked oracle == gathered path, cached generate == recompute, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config

import condify
from condify.cache import RaggedCache, RaggedLayer
from condify.methods import mod_threshold
from condify.methods.mod_threshold import ModThresholdConfig, keep_rates
from condify.patching import patched

COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "gemma3_text": lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 3
    ),
}


def tiny(arch: str = "llama", attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def randomize_routers(model: torch.nn.Module, seed: int = 1) -> None:
    """Routers with large random weights: ragged, far-from-threshold decisions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in patched(model, "mod-threshold"):
            w = layer.router.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 200.0 / w.shape[1] ** 0.5)
            layer.router.bias.fill_(0.0)


def set_mode(model: torch.nn.Module, mode: str) -> None:
    for _, layer in patched(model, "mod-threshold"):
        layer._condify_patch.state.config.mode = mode


def left_padded(batch: int = 4, t: int = 19, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, t))
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 2 * b + 1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_dense_at_init_and_unmodify_exact(arch: str) -> None:
    model = tiny(arch)
    ids, mask = left_padded()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        condify.modify(model, method="mod-threshold")
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    assert [i for i, _ in keep_rates(model, [{"input_ids": ids, "attention_mask": mask}]).items()] == [1, 3]
    condify.unmodify(model)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.model._forward_pre_hooks and not hasattr(model.model.layers[1], "router")
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize(
    "arch, attn", [(a, "sdpa") for a in CONFIGS] + [("llama", "eager"), ("gemma3_text", "eager")]
)
def test_mask_oracle_equals_gather(arch: str, attn: str) -> None:
    model = tiny(arch, attn)
    condify.modify(model, method="mod-threshold", layers=[1, 2, 4])
    randomize_routers(model)
    ids, mask = left_padded(4, 23)
    batch = [{"input_ids": ids, "attention_mask": mask}]
    rates = keep_rates(model, batch)
    assert all(0.1 < r < 0.9 for r in rates.values()), rates  # ragged kept sets
    with torch.no_grad():
        gathered = model(ids, attention_mask=mask).logits
        set_mode(model, "mask")
        masked = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(gathered[real], masked[real], atol=1e-5, rtol=0)


def test_gather_matches_per_sequence_loop() -> None:
    """Batch of 4 with padding == each sequence alone without padding (naive loop oracle)."""
    model = tiny("llama")
    condify.modify(model, method="mod-threshold")
    randomize_routers(model)
    ids, mask = left_padded(4, 21)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b in range(4):
            real = mask[b].bool()
            alone = model(ids[b : b + 1, real]).logits[0]
            torch.testing.assert_close(batched[b, real], alone, atol=1e-4, rtol=0)


def _generate_equal(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int = 8) -> None:
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, **kw)
    full = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_cached_generate_equals_recompute(arch: str) -> None:
    model = tiny(arch)
    condify.modify(model, method="mod-threshold", layers=[1, 2, 4])
    randomize_routers(model)
    ids, mask = left_padded(3, 11)
    _generate_equal(model, ids, mask)


def test_generate_sampling_and_cache_type() -> None:
    model = tiny("llama")
    condify.modify(model, method="mod-threshold")
    randomize_routers(model)
    ids, mask = left_padded(3, 9)
    torch.manual_seed(3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    again = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0, use_cache=False
    )
    assert out.shape == (3, 15) and torch.equal(out, again)
    res = model(ids, attention_mask=mask, use_cache=True)
    cache = res.past_key_values
    assert isinstance(cache, RaggedCache) and isinstance(cache.layers[1], RaggedLayer)
    assert cache.get_seq_length() == 9


def test_kv_bytes_lower_and_ragged() -> None:
    model = tiny("llama")
    ids, mask = left_padded(1, 64)
    with torch.no_grad():
        dense = model(ids, use_cache=True).past_key_values
        dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
        condify.modify(model, method="mod-threshold", layers=[1, 2, 3, 4])
        randomize_routers(model)
        cache = model(ids, use_cache=True).past_key_values
    rates = keep_rates(model, ids)
    for i, r in rates.items():
        assert cache.layers[i].kept_tokens().tolist() == [round(r * 64)]
    expected = dense_bytes * (2 + sum(rates.values())) / 6
    assert cache.condify_nbytes() < dense_bytes
    assert abs(cache.condify_nbytes() - expected) / dense_bytes < 0.02  # + the small slot index


def test_all_skipped_layer_and_nan_handling() -> None:
    model = tiny("llama")
    condify.modify(model, method="mod-threshold", debug_checks=True, sink_tokens=0)
    with torch.no_grad():
        for _, layer in patched(model, "mod-threshold"):
            layer.router.bias.fill_(-50.0)  # nobody takes the gated layers
    ids, mask = left_padded(2, 7)
    _generate_equal(model, ids, mask, new=4)
    assert set(keep_rates(model, ids).values()) == {0.0}
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight[5] = float("nan")
    ids[0, 3] = 5
    with pytest.raises(FloatingPointError, match="non-finite"):
        model(ids)
    # without debug checks a NaN gate keeps the token: the NaN shows in the output, no silent skip
    condify.unmodify(model)
    condify.modify(model, method="mod-threshold")
    with torch.no_grad():
        assert torch.isnan(model(ids).logits[0, 3:]).all()


def test_training_forward_gives_router_gradients() -> None:
    model = tiny("llama").train()
    condify.modify(model, method="mod-threshold")
    randomize_routers(model)
    ids, _ = left_padded(2, 12)
    model(ids, labels=ids).loss.backward()
    for _, layer in patched(model, "mod-threshold"):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny("llama")
    condify.modify(model, method="mod-threshold", threshold=0.4, sink_tokens=2)
    randomize_routers(model)
    ids, mask = left_padded(3, 13)
    condify.save_pretrained(model, tmp_path)
    loaded = condify.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    cfg = condify.applied_configs(loaded)[0]
    assert isinstance(cfg, ModThresholdConfig) and cfg.threshold == 0.4 and cfg.sink_tokens == 2
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_sink_tokens_always_kept() -> None:
    model = tiny("llama")
    condify.modify(model, method="mod-threshold", sink_tokens=3)
    with torch.no_grad():
        for _, layer in patched(model, "mod-threshold"):
            layer.router.bias.fill_(-50.0)
    rates = keep_rates(model, torch.randint(3, 128, (2, 12)))
    assert all(r == pytest.approx(3 / 12) for r in rates.values())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"capacity": 0.0}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"layers": [1, 9]}, "out of range"),
        ({"mode": "fast"}, "mode"),
        ({"gate": 1}, "unknown options"),
    ],
)
def test_bad_options_leave_model_unchanged(options: dict, match: str) -> None:
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        condify.modify(model, method="mod-threshold", **options)
    assert condify.applied_configs(model) == [] and not patched(model)
    assert model.state_dict().keys() == before.keys()


def test_overlap_with_other_method_refused() -> None:
    model = tiny("llama")
    condify.modify(model, method="layer-parallel", layers=[2, 3])
    with pytest.raises(condify.ModifyError, match="overlaps"):
        condify.modify(model, method="mod-threshold", layers=[1, 3])
    assert [c.method for c in condify.applied_configs(model)] == ["layer-parallel"]
    assert not patched(model, "mod-threshold") and not hasattr(model.model.layers[1], "router")
    condify.modify(model, method="mod-threshold", layers=[1, 4])  # disjoint layers compose
    with pytest.raises(condify.ModifyError, match="already modified"):
        condify.modify(model, method="mod-threshold", layers=[5])


def test_unsupported_attention_and_static_cache() -> None:
    model = tiny("llama", attn="sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(condify.ConfigError, match="attention implementation"):
        condify.modify(model, method="mod-threshold")
    model.config._attn_implementation = "sdpa"
    condify.modify(model, method="mod-threshold")
    ids, mask = left_padded(2, 7)
    with pytest.raises(TypeError, match="dynamic KV cache"):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0
        )


def test_short_calibrate_moves_keep_rates_toward_target() -> None:
    model = tiny("llama")
    condify.modify(model, method="mod-threshold", layers=[1, 2, 3, 4])
    data = [torch.randint(3, 128, (4, 32)) for _ in range(3)]
    holdout = [torch.randint(3, 128, (4, 32))]
    res = condify.calibrate(
        model, data, capacity=0.5, steps=4, router_steps=2, holdout=holdout, progress=False
    )
    assert set(res["keep_rates"]) == {1, 2, 3, 4}
    assert all(abs(r - 0.5) <= 0.05 for r in res["keep_rates"].values()), res["keep_rates"]
    assert all(abs(r - 0.5) <= 0.25 for r in res["keep_rates_holdout"].values()), res["keep_rates_holdout"]
    tries = len(res["tried"])  # training that lost to the training-free routers is tried once more
    assert res["tokens"] == tries * 6 * 4 * 32 and len(res["losses"]) == len(res["train_keep"]) == 6
    assert condify.applied_configs(model)[0].capacity == 0.5
    _generate_equal(model, *left_padded(3, 9), new=5)


def test_fit_biases_sets_the_keep_rate_on_any_data_and_refuses_a_bad_capacity() -> None:
    """What a user runs after their own training loop: the keep-rate of every gated layer on the data
    becomes the capacity (to one token); a capacity out of range changes nothing."""
    model = tiny("llama")
    condify.modify(model, "mod-threshold", capacity=0.5, sink_tokens=0)
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    mod_threshold.routing.init_routers(model, [{"input_ids": x}])
    with torch.no_grad():
        for _, m in patched(model, "mod-threshold"):
            m.router.bias += 3.0  # keeps (nearly) every token: what a lagging controller leaves
    assert min(keep_rates(model, x).values()) > 0.8
    biases = [float(m.router.bias.detach()) for _, m in patched(model, "mod-threshold")]
    with pytest.raises(condify.ConfigError, match="`capacity` must be in \\(0, 1\\]"):
        mod_threshold.fit_biases(model, x, 1.5)
    assert [float(m.router.bias.detach()) for _, m in patched(model, "mod-threshold")] == biases
    shifts = mod_threshold.fit_biases(model, x, 0.5)  # a (b, t) tensor, as calibrate takes
    assert all(v < 0 for v in shifts.values())
    assert all(abs(r - 0.5) <= 1 / x.numel() for r in keep_rates(model, x).values())


def test_calibrate_scores_what_it_returns_at_the_target_capacity() -> None:
    """Each pass is scored with the biases fitted to the target (the controller lags it while the layers
    train), so the pass kept scores exactly what calibrate returns and reports."""
    from condify.batches import as_batches
    from condify.methods.mod_threshold.routing import at_capacity

    model = tiny("llama")
    condify.modify(model, method="mod-threshold", layers=[1, 2, 3, 4])
    torch.manual_seed(0)
    data = [torch.randint(3, 128, (4, 32)) for _ in range(3)]
    holdout = [torch.randint(3, 128, (4, 32))]
    res = condify.calibrate(
        model, data, capacity=0.5, steps=9, holdout=holdout, progress=False, lr=1e-3, router_lr=1e-2
    )
    passes = res["passes"]
    assert res["lr_factor"] == 1.0 and len(passes["held_nll"]) == 3, (res["tried"], passes)
    kept = passes["held_nll"][int(passes["kept"]) - 1]
    assert math.isclose(math.log(res["ppl"]), kept, rel_tol=1e-9), (res["ppl"], passes)
    gated = [layer for _, layer in patched(model, "mod-threshold")]
    with torch.no_grad():
        for layer in gated:
            layer.router.bias += 3.0  # keeps more than the target
    moved = [float(layer.router.bias) for layer in gated]
    with at_capacity(model, as_batches(data, torch.device("cpu")), 0.5):
        assert all(abs(r - 0.5) <= 0.05 for r in keep_rates(model, data).values())
    assert [float(layer.router.bias) for layer in gated] == moved


@pytest.mark.slow
def test_smollm2_dense_at_init_and_cached_generate() -> None:
    data = pytest.importorskip("condify.data")
    model, tok = data.load_model()
    model.eval()
    ids, mask = left_padded(3, 24, vocab=1000)
    ids = ids.masked_fill(mask == 0, tok.pad_token_id or 0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        condify.modify(model, method="mod-threshold")
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    randomize_routers(model)
    _generate_equal(model, ids, mask, new=8)


def test_default_layers_and_version1_checkpoint_config() -> None:
    assert ModThresholdConfig().resolve(30) == list(range(3, 28, 2))  # not 0-2, not the last two
    assert ModThresholdConfig().resolve(8) == [3, 5]
    assert ModThresholdConfig().resolve(6) == [1, 3]  # small models: every other layer from 1
    old = ModThresholdConfig.from_dict({"method": "mod-threshold", "version": 1, "layers": None})
    assert old.resolve(30) == list(range(1, 29, 2)) and old.sink_tokens == 0
    model = tiny("llama")
    condify.modify(model, method="mod-threshold")
    assert condify.applied_configs(model)[0].to_dict()["layers"] == [1, 3]  # saved explicitly


def test_sink_tokens_are_the_first_real_tokens_under_left_padding() -> None:
    model = tiny("llama")
    condify.modify(model, method="mod-threshold", sink_tokens=2)
    with torch.no_grad():
        for _, layer in patched(model, "mod-threshold"):
            layer.router.bias.fill_(-50.0)  # only the sinks take the gated layers
    ids, mask = left_padded(4, 12)
    rates = keep_rates(model, [{"input_ids": ids, "attention_mask": mask}])
    assert all(r == pytest.approx(2 * 4 / int(mask.sum())) for r in rates.values())
    state = next(iter(patched(model, "mod-threshold")))[1]._condify_patch.state.shared
    state.record = {}
    with torch.no_grad():
        model(ids, attention_mask=mask)
    _, keep, _, _ = state.record[1]
    first = mask.argmax(1)  # index of the first real token
    for b in range(4):
        assert keep[b].nonzero().flatten().tolist() == [first[b].item(), first[b].item() + 1]
    state.record = None


def test_layer_sensitivity_finds_an_inert_layer_and_leaves_the_model_unchanged() -> None:
    model = tiny("llama")
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: skipping it is free
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randint(3, 128, (2, 24)) for _ in range(2)]
    sens = mod_threshold.layer_sensitivity(model, data, capacity=0.5, progress=False)
    assert sorted(sens) == [1, 2, 3, 4]
    assert sens[2] == pytest.approx(0.0, abs=1e-7) and all(sens[i] > 1e-5 for i in (1, 3, 4)), sens
    assert mod_threshold.least_sensitive_layers(model, data, 1, progress=False) == [2]
    assert condify.applied_configs(model) == [] and not patched(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    condify.modify(model, method="mod-threshold")
    with pytest.raises(condify.ConfigError, match="before modify"):
        mod_threshold.layer_sensitivity(model, data, progress=False)


def test_calibrate_chooses_the_default_layers_by_sensitivity_and_keeps_given_ones(tmp_path) -> None:
    def inert(model: torch.nn.Module) -> torch.nn.Module:  # layers 2 and 4 add nothing: free to skip
        with torch.no_grad():
            for i in (2, 4):
                model.model.layers[i].self_attn.o_proj.weight.zero_()
                model.model.layers[i].mlp.down_proj.weight.zero_()
        return model

    data = [torch.randint(3, 128, (2, 24)) for _ in range(3)]
    held = [torch.randint(3, 128, (2, 24))]
    model = inert(tiny("llama"))
    condify.modify(model, method="mod-threshold")  # the rule's set: [1, 3]
    assert condify.applied_configs(model)[0].auto_layers
    res = condify.calibrate(model, data, capacity=0.5, steps=0, holdout=held, progress=False)
    assert res["layers"] == [2, 4] and set(res["keep_rates"]) == {2, 4}
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in res["layer_sensitivity"].values())
    cfg = condify.applied_configs(model)[0]
    assert cfg.layers == [2, 4] and not cfg.auto_layers and res["ratio"] == pytest.approx(1.0, abs=1e-5)
    condify.save_pretrained(model, tmp_path)  # the chosen set is what is saved and reloaded
    assert condify.applied_configs(condify.from_pretrained(tmp_path))[0].layers == [2, 4]
    again = condify.calibrate(model, data, capacity=0.5, steps=0, holdout=held, progress=False)
    assert "layer_sensitivity" not in again  # chosen once

    given = inert(tiny("llama"))
    condify.modify(given, method="mod-threshold", layers=[1, 3])
    assert not condify.applied_configs(given)[0].auto_layers
    res = condify.calibrate(given, data, capacity=0.5, steps=0, holdout=held, progress=False)
    assert set(res["keep_rates"]) == {1, 3} and condify.applied_configs(given)[0].layers == [1, 3]
    trained = inert(tiny("llama"))
    condify.modify(trained, method="mod-threshold")
    randomize_routers(trained)  # routers trained in the user's own loop: their layers are the user's
    res = condify.calibrate(trained, data, capacity=0.5, steps=0, holdout=held, progress=False)
    assert set(res["keep_rates"]) == {1, 3} and not condify.applied_configs(trained)[0].auto_layers
    old = ModThresholdConfig.from_dict({"method": "mod-threshold", "version": 2, "layers": [1, 3]})
    assert not old.auto_layers  # checkpoints before version 3 keep their layers
