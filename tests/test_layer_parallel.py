"""layer-parallel: the pair formula, fused == generic, KV cache in generate(), calibration sweep, fine-tune."""

from __future__ import annotations

import math
from inspect import signature

import pytest
import torch
from tiny import tiny
from transformers.masking_utils import create_causal_mask

import condify
from condify.training import mean_nll


def manual_forward(model, ids: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Oracle: run the dense Llama submodules by hand, applying the paper's pair formula."""
    inner = model.model
    x = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = inner.rotary_emb(x, position_ids=pos)
    no_cache = {
        k: None for k in ("cache", "past_key_values") if k in signature(create_causal_mask).parameters
    }
    mask = create_causal_mask(
        config=model.config, inputs_embeds=x, attention_mask=None, position_ids=pos, **no_cache
    )
    starts = {a: b for a, b in pairs}

    def attn(layer, h):
        return layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask)[0]

    def mlp(layer, h):
        return layer.mlp(layer.post_attention_layernorm(h))

    i = 0
    while i < len(inner.layers):
        la = inner.layers[i]
        if i in starts:
            lb = inner.layers[starts[i]]
            a = x + attn(la, x) + attn(lb, x)
            x = a + mlp(la, a) + mlp(lb, a)
            i += 2
        else:
            a = x + attn(la, x)
            x = a + mlp(la, a)
            i += 1
    return model.lm_head(inner.norm(x))


@pytest.mark.parametrize("fuse", [False, True])
def test_matches_pair_formula(fuse):
    model = tiny("llama", attention_bias=True)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = manual_forward(model, ids, [(1, 2), (3, 4)])
        condify.modify(model, "layer-parallel", pairs=2, start=1, fuse=fuse)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_fused_equals_generic(arch):
    ids = torch.randint(0, 128, (3, 12))
    out = {}
    for fuse in (False, True):
        model = tiny(arch)
        condify.modify(model, "layer-parallel", pairs=2, start=1, fuse=fuse)
        assert model.model.layers[1]._condify_patch.state.fused is fuse
        with torch.no_grad():
            out[fuse] = model(ids).logits
    torch.testing.assert_close(out[True], out[False], atol=2e-5, rtol=1e-5)


def _left_padded(batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, length))
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 2 * b] = 0
        ids[b, : 2 * b] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("fuse", [False, True])
def test_generate_cache_equals_recompute(arch, fuse):
    model = tiny(arch)
    condify.modify(model, "layer-parallel", pairs=2, start=1, fuse=fuse)
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_fused_weights_follow_parameter_updates_and_train():
    model = tiny("llama")
    condify.modify(model, "layer-parallel", pairs=1, start=2)
    ids = torch.randint(0, 128, (2, 8))
    before = model(ids).logits.detach()
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(2)  # cached fused weights must notice
    after = model(ids).logits.detach()
    assert not torch.allclose(before, after)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.model.layers[3].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_calibrate_sweep_picks_the_best_start():
    model = tiny("llama", num_hidden_layers=8)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    condify.modify(model, "layer-parallel", pairs=1)
    result = condify.calibrate(
        model, batches, pairs=1, sweep_batches=2, holdout=0, placement="contiguous", progress=False
    )
    # brute force over the same candidates
    condify.unmodify(model)
    scores = {}
    for s in range(1, 8 - 2):
        condify.modify(model, "layer-parallel", pairs=1, start=s)
        scores[s] = mean_nll(model, [{"input_ids": b} for b in batches])
        condify.unmodify(model)
    assert result["start"] == min(scores, key=scores.get)
    assert condify.applied_configs(model) == []  # the brute force above unmodified it


def test_calibrate_budget_and_finetune_only_touches_pairs():
    model = tiny("llama", num_hidden_layers=8)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    condify.modify(model, "layer-parallel", pairs=1)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    result = condify.calibrate(
        model,
        batches,
        max_ppl_increase=10.0,
        sweep_batches=1,
        finetune_steps=3,
        lr=1e-3,
        progress=False,
        keep_if_better=False,  # the mechanism, on random data: kept as trained
    )
    cfg = condify.applied_configs(model)[0]
    assert cfg.pairs == result["pairs"] >= 1 and cfg.start == result["start"]
    paired = {f"model.layers.{i}." for i in result["layers"]}
    for k, v in model.state_dict().items():
        if not torch.equal(v, frozen[k]):
            assert any(k.startswith(p) for p in paired), f"{k} changed but is not in a paired layer"
    assert any(not torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    assert result["finetune_tokens"] == 3 * 32


def test_calibrate_rejects_impossible_budget_and_keeps_model():
    model = tiny("llama", num_hidden_layers=8)
    data = torch.randint(0, 128, (2, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):  # memorise the batch so that any pairing costs perplexity
        opt.zero_grad()
        model(data, labels=data).loss.backward()
        opt.step()
    model.eval()
    dense = mean_nll(model, [{"input_ids": data}])
    scores = {}
    for s in range(1, 6):
        condify.modify(model, "layer-parallel", pairs=1, start=s)
        scores[s] = mean_nll(model, [{"input_ids": data}])
        condify.unmodify(model)
    worst = max(scores, key=scores.get)
    assert scores[worst] > dense
    condify.modify(model, "layer-parallel", pairs=1, start=3)
    with pytest.raises(condify.ConfigError, match="raise the budget"):
        condify.calibrate(model, [data], max_ppl_increase=1e-6, starts=[worst], progress=False)
    assert condify.applied_configs(model)[0].start == 3
    with pytest.raises(condify.ConfigError, match="unknown options"):
        condify.calibrate(model, [torch.randint(0, 128, (2, 16))], nope=1)


def test_disjoint_pairs_match_the_oracle():
    model = tiny("llama", num_hidden_layers=8)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = manual_forward(model, ids, [(1, 2), (5, 6)])
        condify.modify(model, "layer-parallel", layers=[1, 2, 5, 6])
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert condify.applied_configs(model)[0].layers == [1, 2, 5, 6]


def test_gemma3_mixed_attention_pair_runs_each_layers_own_attention(tmp_path):
    """A sliding + full pair: each layer's attention gets the mask and rotary the model gives it."""
    model = tiny("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 3, sliding_window=4)
    ids = torch.randint(0, 128, (2, 11))
    seen: dict[int, tuple] = {}

    def grab(i):
        def hook(mod, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"], kwargs)

        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (2, 3)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    x = seen[2][0]

    def attn(i, h):
        layer, kw = model.model.layers[i], seen[i][1]
        kw = {k: v for k, v in kw.items() if k in ("position_embeddings", "attention_mask")}
        out = layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]
        return layer.post_attention_layernorm(out)

    def mlp(i, h):
        layer = model.model.layers[i]
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))

    with torch.no_grad():
        a = x + attn(2, x) + attn(3, x)
        expected = a + mlp(2, a) + mlp(3, a)
        condify.modify(model, "layer-parallel", layers=[2, 3])
        out = {}
        h = model.model.layers[3].register_forward_hook(lambda m, a_, o: out.setdefault("y", o))
        model(ids)
        h.remove()
    torch.testing.assert_close(out["y"], expected, atol=1e-5, rtol=1e-5)
    assert model.model.layers[2]._condify_patch.state.mixed
    prompt = torch.randint(0, 128, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))
    condify.save_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(condify.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_calibrate_any_placement_takes_the_least_sensitive_disjoint_pairs():
    model = tiny("llama", num_hidden_layers=10)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    condify.modify(model, "layer-parallel", pairs=1)
    result = condify.calibrate(
        model, batches, pairs=2, sweep_batches=1, holdout=1, finetune_steps=0, progress=False
    )
    cost = result["pair_ppl"]
    chosen = condify.applied_configs(model)[0].resolve(10)
    firsts = chosen[::2]
    assert len(firsts) == 2 and chosen == result["layers"]
    assert min(cost, key=cost.get) in firsts or chosen == list(range(chosen[0], chosen[0] + 4))
    # never worse than the best contiguous range on the sweep batch (it is the rival)
    assert math.exp(mean_nll(model, [{"input_ids": batches[0]}])) <= result["contiguous_ppl"] * (1 + 1e-5)


@pytest.mark.slow
def test_smollm2_generate_cache_equals_recompute():
    from condify import data

    model, tok = data.load_model()
    tok.padding_side = "left"
    prompts = [
        "To be, or not to be, that is",
        "Friends, Romans,",
        "Now is the winter of our discontent made glorious",
    ]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()  # really left-padded
    condify.modify(model, "layer-parallel", pairs=2, start=20)
    kw = dict(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with_cache = model.generate(**kw)
    without = model.generate(use_cache=False, **kw)
    assert torch.equal(with_cache, without)
