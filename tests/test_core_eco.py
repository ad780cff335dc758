"""Ecosystem regressions of the core and mod-threshold (issue #17): PEFT models, folders loaded by plain
transformers, calibrating one of two composed methods, the meta device, torch.compile, static caches and
what ``describe`` reports. Each test is checked against the dense model, a reference built another way
(e.g. modify-then-wrap vs wrap-then-modify) or eager execution."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from peft import LoraConfig, get_peft_model
from small import one_thread  # noqa: F401 (autouse fixture)
from test_mod_threshold import left_padded, randomize_routers
from tiny import CONFIGS, tiny
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import condify
from condify.cache import RaggedLayer, UnsupportedCacheError
from condify.convert import free_layers
from condify.methods.dynamic_k.modules import set_tau
from condify.patching import patched


def ids(b: int = 3, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=x, use_cache=False, **kw).logits


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _routed() -> torch.nn.Module:
    model = tiny("llama")
    condify.modify(model, "mod-threshold")
    randomize_routers(model)
    return model


def lora(model: torch.nn.Module, targets: list[str], seed: int = 2) -> torch.nn.Module:
    """LoRA (r=4) on ``targets`` with A and B drawn from ``seed`` (B nonzero: the adapters change the
    function; the same seed gives the same adapters whatever else the model holds)."""
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pm.eval()


# ----------------------------------------------------------------------------------------------------------
# 1. PEFT models
# ----------------------------------------------------------------------------------------------------------


def test_peft_modify_after_wrap_equals_wrap_after_modify_mod_threshold():
    """modify(peft_model) converts the base model in place; the result is the model converted first and
    wrapped after (same LoRA weights, same routers), and LoRA and routers both get gradients."""
    x = ids()
    first = tiny("llama")
    condify.modify(first, "mod-threshold")
    randomize_routers(first)
    first = lora(first, ["q_proj", "v_proj", "down_proj"])

    pm = lora(tiny("llama"), ["q_proj", "v_proj", "down_proj"])
    before = logits(pm, x)
    assert condify.modify(pm, "mod-threshold") is pm  # the wrapper is returned, still wrapping the base
    torch.testing.assert_close(logits(pm, x), before, atol=1e-5, rtol=0)  # dense at init, LoRA kept
    base = pm.get_base_model()
    assert [c.method for c in condify.applied_configs(pm)] == ["mod-threshold"]
    assert condify.applied_configs(base) == condify.applied_configs(pm)
    randomize_routers(base)
    assert torch.equal(logits(pm, x), logits(first, x))
    assert "model.layers.1 (+router)" in condify.describe(pm)

    pm.train()
    pm(input_ids=x, labels=x, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if "lora_" in n or "router" in n}
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())

    pm.eval()
    adapted = logits(pm, x)
    condify.unmodify(pm)  # exact with the adapters inside: the routers and forwards go, LoRA stays
    assert not patched(pm) and not hasattr(base.config, "condify")
    plain = lora(tiny("llama"), ["q_proj", "v_proj", "down_proj"])
    assert torch.equal(logits(pm, x), logits(plain, x))
    assert not torch.equal(adapted, logits(pm, x))


def test_peft_modify_after_wrap_equals_wrap_after_modify_layer_parallel():
    """layer-parallel is peft_safe too: on a LoRA-wrapped model its pairs run the generic path (each
    layer's wrapped modules), equal to converting first and wrapping after; unmodify keeps the adapters."""
    x = ids()
    first = tiny("llama")
    condify.modify(first, "layer-parallel", pairs=1, start=2)
    first = lora(first, ["q_proj", "v_proj", "down_proj"])
    pm = lora(tiny("llama"), ["q_proj", "v_proj", "down_proj"])
    assert condify.modify(pm, "layer-parallel", pairs=1, start=2) is pm
    torch.testing.assert_close(logits(pm, x), logits(first, x), atol=1e-5, rtol=1e-5)
    pm.train()
    pm(input_ids=x, labels=x, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())
    pm.eval()
    condify.unmodify(pm)
    assert not patched(pm)
    plain = lora(tiny("llama"), ["q_proj", "v_proj", "down_proj"])
    assert torch.equal(logits(pm, x), logits(plain, x))


def test_peft_modify_refused_where_adapters_sit_in_rewritten_modules():
    """dynamic-k permutes the MLP neurons in place: converting LoRA'd MLPs would misalign the adapters,
    so it is refused before anything changes, naming the order; adapters elsewhere are fine."""
    pm = lora(tiny("llama"), ["gate_proj", "q_proj"])
    before = state(pm)
    with pytest.raises(condify.ModifyError, match="(?i)convert first, then wrap"):
        condify.modify(pm, "dynamic-k", expert_size=8)
    assert same(state(pm), before) and not patched(pm) and not hasattr(pm.get_base_model().config, "condify")

    pm = lora(tiny("llama"), ["q_proj", "v_proj"])  # attention only: dynamic-k's MLPs hold no adapter
    x = ids()
    before = logits(pm, x)
    condify.modify(pm, "dynamic-k", expert_size=8)  # tau 0: every expert runs, dense
    torch.testing.assert_close(logits(pm, x), before, atol=1e-5, rtol=1e-5)


def test_peft_unmodify_refused_under_adapters_then_exact_after_merge(tmp_path):
    """modify -> wrap -> unmodify would un-permute dynamic-k's MLPs under adapters trained on the
    permuted layout: refused, naming merge_and_unload; after merging, unmodify keeps the merged function.
    save_pretrained of a PEFT model is refused (a condify folder holds plain weights), nothing written."""
    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8)  # tau 0: dense
    pm = lora(model, ["gate_proj", "up_proj", "down_proj", "q_proj"])
    x = ids()
    before = state(pm)
    with pytest.raises(condify.ModifyError, match="merge_and_unload"):
        condify.unmodify(pm)
    assert same(state(pm), before) and [c.method for c in condify.applied_configs(pm)] == ["dynamic-k"]
    with pytest.raises(condify.CheckpointError, match="merge_and_unload"):
        condify.save_pretrained(pm, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and list(tmp_path.iterdir()) == []
    merged = pm.merge_and_unload()
    with_delta = logits(merged, x)  # tau 0: the merged dynamic-k model is dense
    condify.unmodify(merged)
    assert not patched(merged)
    torch.testing.assert_close(logits(merged, x), with_delta, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_delta, logits(tiny("llama"), x), atol=1e-3)  # the merged deltas count


def test_peft_calibrate_of_a_wrapped_model_trains_what_its_options_say():
    """calibrate(peft_model) unwraps; train="routers" changes the routers only (LoRA and base untouched)."""
    pm = lora(tiny("llama"), ["q_proj", "v_proj"])
    condify.modify(pm, "mod-threshold", layers=[1, 2, 3, 4])
    before, grads = state(pm), {n: p.requires_grad for n, p in pm.named_parameters()}
    res = condify.calibrate(pm, DATA, capacity=0.5, steps=2, router_steps=1, train="routers", progress=False)
    assert all(abs(r - 0.5) <= 0.05 for r in res["keep_rates"].values()), res["keep_rates"]
    now = state(pm)
    changed = {k.split(".")[-2] for k in now if not torch.equal(now[k], before[k])}
    assert changed == {"router"}
    assert grads == {n: p.requires_grad for n, p in pm.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# 2. a condify folder loaded by plain transformers
# ----------------------------------------------------------------------------------------------------------


def _saved(tmp_path, method: str, **options) -> tuple[torch.nn.Module, object]:
    model = tiny("llama")
    condify.modify(model, method, **options)
    if method == "mod-threshold":
        randomize_routers(model)
    path = tmp_path / method
    condify.save_pretrained(model, path)
    return model, path


def test_vanilla_loaded_folder_is_dense_for_describe_and_modify(tmp_path):
    """A condify folder loaded by plain transformers: dense modules, config.condify kept. condify goes by
    the modules: describe says dense (one warning), a refused call leaves the config as it was, modify
    converts it (and drops the stale entry)."""
    _, path = _saved(tmp_path, "mod-threshold")
    dense = tiny("llama")
    vanilla = AutoModelForCausalLM.from_pretrained(path).eval()
    recorded = json.dumps(vanilla.config.condify)  # transformers keeps the entry ...
    x = ids()
    assert torch.equal(logits(vanilla, x), logits(dense, x))  # ... and builds the dense model
    with pytest.warns(UserWarning, match="stale entry is ignored"):
        assert condify.describe(vanilla) == "LlamaForCausalLM: dense (not modified by condify)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model
        assert condify.applied_configs(vanilla) == []
        with pytest.raises(condify.ModifyError, match="not modified by condify"):
            condify.unmodify(vanilla)
        with pytest.raises(condify.ModifyError, match="calibrate needs a modified model"):
            condify.calibrate(vanilla, DATA, progress=False)
        assert json.dumps(vanilla.config.condify) == recorded  # queries and refusals change nothing
        condify.modify(vanilla, "mod-threshold", layers=[2])  # not "already modified"
    assert [c.layers for c in condify.applied_configs(vanilla)] == [[2]]
    assert [d["layers"] for d in vanilla.config.condify["methods"]] == [[2]]  # the stale entry is gone
    torch.testing.assert_close(logits(vanilla, x), logits(dense, x), atol=1e-5, rtol=0)


def test_vanilla_loaded_folder_resaved_by_condify_is_dense(tmp_path):
    _, path = _saved(tmp_path, "mod-threshold")
    vanilla = AutoModelForCausalLM.from_pretrained(path).eval()
    recorded = json.dumps(vanilla.config.condify)
    with pytest.warns(UserWarning, match="no module of this LlamaForCausalLM is converted"):
        condify.save_pretrained(vanilla, tmp_path / "resaved")
    assert json.dumps(vanilla.config.condify) == recorded  # saving does not change the model
    assert "condify" not in json.loads((tmp_path / "resaved" / "config.json").read_text())
    reloaded = condify.from_pretrained(tmp_path / "resaved").eval()
    assert condify.applied_configs(reloaded) == []
    x = ids()
    assert torch.equal(logits(reloaded, x), logits(tiny("llama"), x))


def test_condify_load_of_dense_weights_with_stale_config_names_the_fix(tmp_path):
    """model.save_pretrained of a vanilla-loaded model keeps config.condify but has no router tensors."""
    _, path = _saved(tmp_path, "mod-threshold")
    vanilla = AutoModelForCausalLM.from_pretrained(path)
    vanilla.save_pretrained(tmp_path / "plain")
    with pytest.raises(condify.CheckpointError, match="none of the 4 tensor.*AutoModelForCausalLM"):
        condify.from_pretrained(tmp_path / "plain")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()  # the fix it names works
    with pytest.warns(UserWarning, match="stale"):
        assert condify.applied_configs(dense) == []


def test_layer_parallel_folder_resaved_by_transformers_loads_converted(tmp_path):
    """layer-parallel adds no tensors: config + dense weights are the converted model, so condify loads a
    folder re-saved by plain transformers as the converted model (nothing to refuse)."""
    model, path = _saved(tmp_path, "layer-parallel", pairs=1, start=2)
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "plain")
    loaded = condify.from_pretrained(tmp_path / "plain").eval()
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model.eval(), x))


# ----------------------------------------------------------------------------------------------------------
# 3. calibrating one of two composed methods
# ----------------------------------------------------------------------------------------------------------


def _composed() -> torch.nn.Module:
    model = tiny("llama")
    condify.modify(model, "layer-parallel", layers=[3, 4])
    condify.modify(model, "mod-threshold", layers=[1, 2])
    randomize_routers(model)
    return model


def _record(model: torch.nn.Module) -> tuple:
    return (
        state(model),
        json.dumps(model.config.condify),
        [(n, m._condify_patch.method) for n, m in patched(model)],
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_recorded(model: torch.nn.Module, rec: tuple) -> None:
    sd, cfg, sites, modes, grads = _record(model)
    assert same(sd, rec[0]) and cfg == rec[1] and sites == rec[2] and modes == rec[3] and grads == rec[4]


DATA = [torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_free_layers_lists_what_other_methods_leave():
    model = _composed()
    assert free_layers(model, "layer-parallel") == [0, 3, 4, 5]
    assert free_layers(model, "mod-threshold") == [0, 1, 2, 5]
    assert free_layers(tiny("llama"), "mod-threshold") == list(range(6))


def test_calibrate_one_of_two_methods_keeps_their_order():
    model = _composed()
    res = condify.calibrate(
        model, DATA, method="layer-parallel", pairs=1, starts=[3], finetune_steps=1, progress=False
    )
    assert res["layers"] == [3, 4]
    assert [c.method for c in condify.applied_configs(model)] == ["layer-parallel", "mod-threshold"]


def test_failed_calibrate_restores_composed_model_exactly():
    """layer-parallel's calibrate removes and re-applies itself (which appends it); a failure in its
    fine-tune, after that, must leave the model as it came: tensors, config.condify order, sites, modes."""
    model = _composed()
    x = ids()
    ref = logits(model, x)
    rec = _record(model)

    def fail_in_training(module, args, out):
        if module.training:
            raise RuntimeError("injected failure in the fine-tune")

    h = model.lm_head.register_forward_hook(fail_in_training)
    with pytest.raises(RuntimeError, match="injected"):
        condify.calibrate(
            model, DATA, method="layer-parallel", pairs=1, starts=[3], finetune_steps=2, progress=False
        )
    h.remove()
    _assert_recorded(model, rec)
    assert torch.equal(logits(model, x), ref)


def test_calibrate_sweep_skips_layers_another_method_owns():
    """The default sweep (every start) must not try pairs on mod-threshold's layers 1, 2."""
    model = _composed()
    res = condify.calibrate(model, DATA, method="layer-parallel", pairs=1, finetune_steps=0, progress=False)
    assert set(res["layers"]).isdisjoint({1, 2})
    assert [c.method for c in condify.applied_configs(model)] == ["layer-parallel", "mod-threshold"]


# ----------------------------------------------------------------------------------------------------------
# 4. the meta device
# ----------------------------------------------------------------------------------------------------------


def test_mod_threshold_meta_modify_forward_then_load_weights():
    """init_empty_weights -> modify -> a forward (shapes only, cache included) -> the converted model's
    tensors loaded (assign=True): the same logits and cached generate as the model converted with weights."""
    real = tiny("llama")
    condify.modify(real, "mod-threshold")
    randomize_routers(real)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    condify.modify(empty, "mod-threshold")
    assert all(p.device.type == "meta" for p in empty.parameters())
    x = ids()
    with torch.no_grad():
        out = empty(input_ids=x.to("meta"), use_cache=True)
    assert out.logits.shape == (3, 10, 128) and out.logits.device.type == "meta"
    assert isinstance(out.past_key_values.layers[1], RaggedLayer)
    empty.load_state_dict(real.state_dict(), assign=True, strict=True)
    empty.eval()
    torch.testing.assert_close(logits(empty, x), logits(real, x), atol=0, rtol=0)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(empty.generate(x, **kw), real.generate(x, **kw))

    moved = tiny("llama").to("meta")  # model.to("meta") then modify and a forward
    condify.modify(moved, "mod-threshold")
    assert moved(input_ids=x.to("meta")).logits.device.type == "meta"


def test_layer_parallel_modify_on_meta_then_load_weights():
    real = tiny("llama")
    condify.modify(real, "layer-parallel", pairs=1, start=2)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    condify.modify(empty, "layer-parallel", pairs=1, start=2)
    empty.load_state_dict(real.state_dict(), assign=True, strict=True)
    x = ids()
    torch.testing.assert_close(logits(empty.eval(), x), logits(real.eval(), x), atol=0, rtol=0)


class CountCalls(ModelHook):
    """An accelerate hook that counts the calls it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("hook_first", [True, False])
def test_accelerate_hook_on_a_converted_layer_keeps_running(hook_first):
    """accelerate's hooks (device_map, offload) wrap a layer's forward; condify's forward goes inside
    the hook, whichever came first, and unmodify leaves the hook around the original forward."""
    x = ids()
    ref = _routed()
    model = tiny("llama")
    hook, layer = CountCalls(), model.model.layers[1]
    if hook_first:
        add_hook_to_module(layer, hook)
    condify.modify(model, "mod-threshold")
    randomize_routers(model)
    if not hook_first:
        add_hook_to_module(layer, hook)
    assert torch.equal(logits(model, x), logits(ref, x)) and hook.calls == 1
    condify.unmodify(model)
    assert torch.equal(logits(model, x), logits(tiny("llama"), x)) and hook.calls == 2
    assert layer._old_forward.__func__ is type(layer).forward
    remove_hook_from_module(layer)
    assert torch.equal(logits(model, x), logits(tiny("llama"), x)) and hook.calls == 2


def test_mod_threshold_cpu_offload_matches():
    """accelerate.cpu_offload after modify: every weight on meta, loaded by hooks per module at call time."""
    x = ids()
    ref = logits(_routed(), x)
    model = _routed()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[1].router.weight.device.type == "meta"
    torch.testing.assert_close(logits(model, x), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 5. torch.compile
# ----------------------------------------------------------------------------------------------------------


def test_mod_threshold_compile_fullgraph_matches_eager_without_cache():
    model = _routed()
    x, mask = left_padded(2, 12)
    with torch.no_grad():
        eager = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on any graph break
        out = compiled(input_ids=x, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], eager[real], atol=1e-5, rtol=0)
    assert not torch.allclose(eager, logits(tiny("llama"), x, attention_mask=mask), atol=1e-3)  # routed


def test_mod_threshold_compile_fullgraph_generate_with_dynamic_cache():
    """A compiled forward (fullgraph) inside generate with its DynamicCache: the same tokens as eager, the
    gated layers' cache ragged (the same kept tokens), and the cache works after compiled steps too."""
    model = _routed()
    x, mask = left_padded(2, 9)
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(x, **kw)
        eager_cache = model(input_ids=x, attention_mask=mask, cache=DynamicCache()).past_key_values
        torch._dynamo.reset()
        forward = model.forward
        model.forward = torch.compile(forward, fullgraph=True, backend="eager", dynamic=True)
        try:
            out = model.generate(x, **kw)
            cache = DynamicCache()
            model(input_ids=x, attention_mask=mask, cache=cache)
        finally:
            model.forward = forward
    assert torch.equal(out, eager)
    assert isinstance(cache.layers[1], RaggedLayer)
    for i in (1, 3):
        assert torch.equal(cache.layers[i].kept_tokens(), eager_cache.layers[i].kept_tokens())
        assert cache.layers[i].keys.shape[2] == 9  # compiled: every row appended, skipped ones empty
    # an eager decode step continues the compiled prefill's cache exactly
    nxt = torch.full((2, 1), 7)
    m2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        a = model(input_ids=nxt, attention_mask=m2, cache=cache).logits
        b = model(input_ids=nxt, attention_mask=m2, cache=eager_cache).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_mod_threshold_compile_fullgraph_inductor_matches_eager():
    model = _routed()
    x, mask = left_padded(2, 12)
    with torch.no_grad():
        eager = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(input_ids=x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out[mask.bool()], eager[mask.bool()], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# 6. static caches and describe
# ----------------------------------------------------------------------------------------------------------


def test_mod_threshold_static_cache_refused_before_any_layer_runs():
    model = _routed()
    x, mask = left_padded(2, 7)
    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(UnsupportedCacheError, match="DynamicCache") as e:
        model(input_ids=x, attention_mask=mask, cache=static)
    assert isinstance(e.value, condify.ConfigError) and isinstance(e.value, TypeError)
    assert not any(layer.is_initialized for layer in static.layers)  # no layer wrote to it
    with pytest.raises(UnsupportedCacheError, match="cache_implementation='static'"):
        model.generate(
            x, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0
        )


def test_describe_after_calibrate_shows_measured_values():
    """mod-threshold: each gated layer's measured held-out keep-rate (not the target capacity);
    dynamic-k: each MLP's calibrated tau, never the config's initial tau 0.0."""
    model = tiny("llama")
    condify.modify(model, "mod-threshold", layers=[1, 2, 3, 4])
    res = condify.calibrate(
        model, DATA, capacity=0.5, steps=2, router_steps=1, holdout=[ids(4, 16, 9)], progress=False
    )
    text = condify.describe(model)
    for i, r in res["keep_rates_holdout"].items():
        assert f"model.layers.{i} (+router): keep_rate={r:.3g}" in text
    assert any(abs(r - 0.5) > 1e-3 for r in res["keep_rates_holdout"].values())  # not the target

    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8)
    taus = {p: 0.1 * (i + 1) for i, (p, _) in enumerate(patched(model, "dynamic-k"))}
    set_tau(model, taus)  # what calibrate's fit_tau does: per-layer thresholds in the buffers
    text = condify.describe(model)
    assert "'tau': 'per site'" in text and "'tau': 0.0" not in text
    for p, t in taus.items():
        assert f"{p} (+router, expert_layout): " in text and f"tau={round(t, 4):.3g}" in text
    set_tau(model, 0.25)
    assert "'tau': 0.25" in condify.describe(model)
