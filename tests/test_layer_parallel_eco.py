"""layer-parallel in the ecosystem: weights never stale (fused optimizers, ``.data`` edits, dtype moves, save/load),
PEFT LoRA and hooks on paired modules, ``torch.compile(fullgraph=True)``, ``output_attentions``, ``describe``.

The fused pair keeps its projection weights as views of shared storage (see ``layer_parallel/modules.py``);
every check here compares against a model that cannot share that mechanism: the generic path (``fuse=False``,
each layer's own modules) or a checkpoint reloaded from disk.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from small import one_thread  # noqa: F401 (autouse: one thread)
from tiny import tiny
from transformers import AutoModelForCausalLM

import condify
from condify.methods.layer_parallel import modules as lp

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def pair_model(fuse: bool = True, **overrides) -> torch.nn.Module:
    model = tiny("llama", **overrides)
    condify.modify(model, "layer-parallel", pairs=2, start=1, fuse=fuse)
    return model


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def generic_logits(model: torch.nn.Module) -> torch.Tensor:
    """The same weights through the generic path (each layer's own modules): the reference."""
    ref = pair_model(fuse=False)
    ref.load_state_dict(model.state_dict())
    return logits(ref.to(next(model.parameters()).dtype))


def first_state(model: torch.nn.Module, i: int = 1) -> lp.PairState:
    return model.model.layers[i]._condify_patch.state


def is_shared(model: torch.nn.Module, i: int = 1) -> bool:
    """Whether pair (i, i+1) currently runs on shared storage (the fast path under test)."""
    st = first_state(model, i)
    ps = lp.plain_parts(st, (model.model.layers[i], st.partner))
    return ps is not None and lp._aliased(st.groups, lp._weights(st.groups, ps))


def test_lp_fused_adamw_steps_are_seen_in_eval(tmp_path):
    """Regression (issue 17.1): after fused-AdamW steps eval logits == reloaded checkpoint == generic path."""
    model = pair_model()
    logits(model)  # eval first: the pairs move onto shared storage
    assert is_shared(model)
    with torch.inference_mode():  # evaluate / generate run here; training must still work after it
        model(IDS)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    got = logits(model)
    assert is_shared(model)  # the optimizer updated the shared storage in place
    condify.save_pretrained(model, tmp_path)
    torch.testing.assert_close(got, logits(condify.from_pretrained(tmp_path)), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, generic_logits(model), rtol=0, atol=1e-5)


def test_lp_data_edits_are_seen():
    """Regression (issue 17.1): every way of changing a weight outside autograd shows in the next forward."""
    model = pair_model()
    logits(model)
    layers = model.model.layers
    edits = [
        lambda: layers[2].mlp.down_proj.weight.data.mul_(2),
        lambda: layers[1].self_attn.k_proj.weight.data.copy_(torch.randn(32, 64)),
        lambda: model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()}),
        lambda: setattr(layers[1].self_attn.q_proj.weight, "data", torch.randn(64, 64)),  # new storage
        lambda: setattr(layers[4].mlp, "up_proj", torch.nn.Linear(64, 96, bias=False)),  # new module
    ]
    before = logits(model)
    for edit in edits:
        with torch.no_grad():
            edit()
        got = logits(model)
        assert not torch.allclose(got, before)
        torch.testing.assert_close(got, generic_logits(model), rtol=0, atol=1e-5)
        assert is_shared(model, 1) and is_shared(model, 3)  # moved back onto shared storage
        before = got


def test_lp_storage_held_elsewhere_is_never_taken_over():
    """A weight whose storage something else holds (a user tensor, FSDP's flat parameter) stays shared
    with it: the pair multiplies by it as it is, and edits through the other holder are seen."""
    model = pair_model()
    logits(model)
    big = torch.randn(2, 64, 64)
    w = model.model.layers[1].self_attn.q_proj.weight
    w.data = big[1]
    got = logits(model)
    torch.testing.assert_close(got, generic_logits(model), rtol=0, atol=1e-5)
    assert not is_shared(model) and w.data_ptr() == big[1].data_ptr()
    big.mul_(2)
    torch.testing.assert_close(logits(model), generic_logits(model), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model), got)


def test_lp_weight_that_is_not_a_parameter_is_used_as_is():
    """A projection whose ``weight`` is a plain tensor attribute (as FSDP's unsharded views are) is used as it
    is; the reference is the generic path, forced by a no-op hook."""
    model = pair_model()
    logits(model)
    lin = model.model.layers[1].self_attn.v_proj
    w = lin.weight.detach().clone() * 2
    del lin.weight
    lin.weight = w
    got = logits(model)
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *args: None)
    torch.testing.assert_close(got, logits(model), rtol=0, atol=1e-5)
    handle.remove()
    assert not is_shared(model)


def test_lp_training_gradients_equal_generic_path():
    """With gradients the fused pair is differentiable w.r.t. the original parameters: the same loss and
    gradients as the generic path, also after the pairs ran on shared storage."""
    fused, generic = pair_model(), pair_model(fuse=False)
    logits(fused)
    assert is_shared(fused)
    grads = {}
    for name, model in (("fused", fused), ("generic", generic)):
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads["generic"].items():
        torch.testing.assert_close(grads["fused"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_lp_to_bfloat16_still_fuses_and_is_exact():
    """Regression (issue 17.1): ``model.to(bfloat16)`` (new storage for every weight) re-shares and matches."""
    model = pair_model()
    logits(model)
    model.to(torch.bfloat16)
    got = logits(model)
    assert got.dtype == torch.bfloat16 and is_shared(model)
    torch.testing.assert_close(got, generic_logits(model), rtol=0, atol=0.05)
    model.to(torch.float32)
    torch.testing.assert_close(logits(model), generic_logits(model), rtol=0, atol=1e-5)


def test_lp_meta_init_then_load_runs_exactly():
    """Weights materialised after ``modify`` on the meta device are picked up (nothing built from meta)."""
    dense = tiny("llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(dense.config)
    condify.modify(model, "layer-parallel", pairs=2, start=1)
    model.to_empty(device="cpu")
    model.load_state_dict(dense.state_dict())
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        for name, buf in dense.named_buffers():
            model.get_buffer(name).copy_(buf)
    model.eval()
    got = logits(model)
    assert is_shared(model)
    torch.testing.assert_close(got, generic_logits(model), rtol=0, atol=1e-5)


def test_lp_save_load_with_shared_storage(tmp_path):
    """Regression (issue 17.1): a model running on shared storage saves (condify and vanilla loaders) and
    reloads with the same logits; the file holds exactly the dense model's tensor names."""
    model = pair_model()
    want = logits(model)
    assert is_shared(model)
    condify.save_pretrained(model, tmp_path)
    torch.testing.assert_close(logits(condify.from_pretrained(tmp_path)), want, rtol=0, atol=0)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert vanilla.state_dict().keys() == model.state_dict().keys()
    for k, v in vanilla.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_lp_unmodify_restores_independent_parameters():
    """Regression (issue 17.1): after ``unmodify`` every parameter owns its storage again, same objects,
    names and values, and the model is the dense one."""
    dense = tiny("llama")
    model = pair_model()
    params = dict(model.named_parameters())
    logits(model)
    assert is_shared(model)
    condify.unmodify(model)
    assert dict(model.named_parameters()) == params  # same objects under the same names
    for name, p in model.named_parameters():
        assert p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
        assert torch.equal(p, dense.get_parameter(name)), name
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=0)


def test_lp_peft_lora_on_every_projection_gets_gradient_and_changes_outputs():
    """Regression (issue 17.2): LoRA on q/k/v/o/gate/up/down of paired layers trains and counts; the pair then
    runs each layer's own (wrapped) modules, equal to the fused pair with the LoRA merged in."""
    base = pair_model()
    before = logits(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights=False))
    assert lp.plain_parts(first_state(base), (base.model.layers[1], base.model.layers[2])) is None
    model(IDS, labels=IDS).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 6 * len(PROJ) * 2
    for name, p in lora:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    got = logits(model)
    assert not torch.allclose(got, before, atol=1e-3)
    merged = model.merge_and_unload()  # plain nn.Linear again, LoRA folded into the weights
    torch.testing.assert_close(logits(merged), got, rtol=0, atol=1e-5)
    assert is_shared(merged)


def test_lp_forward_hook_on_a_paired_projection_fires():
    """Regression (issue 17.2): a forward hook on a paired layer's q_proj fires, and what it returns counts."""
    model = pair_model()
    plain = logits(model)
    calls = []
    q = model.model.layers[2].self_attn.q_proj
    handle = q.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    torch.testing.assert_close(logits(model), plain, rtol=0, atol=1e-5)
    assert calls == [(2, 10, 64)]
    handle.remove()
    handle = q.register_forward_hook(lambda m, args, out: 2 * out)
    assert not torch.allclose(logits(model), plain)
    handle.remove()
    torch.testing.assert_close(logits(model), plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)], ids=["aot_eager", "inductor"]
)
def test_lp_compile_fullgraph_matches_eager(backend):
    """Regression (issue 17.3): ``torch.compile(fullgraph=True)`` traces the fused pairs (no storage check in
    the graph: compiled code multiplies by each parameter) and follows in-place weight updates."""
    torch._dynamo.reset()
    model = pair_model()
    eager = logits(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.testing.assert_close(logits(compiled), eager, rtol=0, atol=1e-5)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(2)
    torch.testing.assert_close(logits(compiled), logits(model), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(compiled), eager)


def test_lp_output_attentions_one_map_per_layer():
    """Regression (issue 17.4): ``output_attentions=True`` returns one map per layer, paired layers included
    (each layer's heads of the shared attention call), equal to the generic path's; the pairs keep fusing."""
    out = {}
    for fuse in (False, True):
        model = pair_model(fuse=fuse)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out[fuse] = model(IDS, output_attentions=True).attentions
    assert len(out[True]) == len(out[False]) == 6
    for got, want in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # transformers' capture hooks stay installed on the attention modules: the fused path still runs
    assert lp.plain_parts(first_state(model), (model.model.layers[1], model.model.layers[2])) is not None
    logits(model)
    assert is_shared(model)


def test_lp_describe_shows_pair_fused_mixed_only():
    """Regression (issue 17.8): ``describe`` shows what each pair is, never internal state (after a forward)."""
    model = pair_model()
    logits(model)
    lines = condify.describe(model).splitlines()
    pair_lines = [ln.strip() for ln in lines if ln.strip().startswith("model.layers.")]
    assert pair_lines == [
        "model.layers.1: pair=(1, 2), fused=True",
        "model.layers.2: pair=(1, 2), fused=True",
        "model.layers.3: pair=(3, 4), fused=True",
        "model.layers.4: pair=(3, 4), fused=True",
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["shared-storage", "per-projection"])
def test_lp_fused_with_biases_equals_generic(grad):
    """Both fused variants (shared storage in inference, per-projection with gradients) add every bias."""
    bias = dict(attention_bias=True, mlp_bias=True)
    fused, generic = pair_model(**bias), pair_model(fuse=False, **bias)
    with torch.no_grad():
        for p in fused.parameters():
            if p.dim() == 1:
                p.normal_()
    generic.load_state_dict(fused.state_dict())
    with torch.set_grad_enabled(grad):
        got = fused(IDS).logits
    assert is_shared(fused) is not grad
    torch.testing.assert_close(got.detach(), logits(generic), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lp_smollm2_fused_adamw_matches_reloaded_checkpoint(tmp_path):
    """Regression (issue 17.1) on the embedded SmolLM2: 2 fused-AdamW steps at lr 1e-5, eval logits in memory
    == the checkpoint reloaded from disk (0.08 apart before the fix)."""
    from condify import data

    model, tok = data.load_model()
    condify.modify(model, "layer-parallel", layers=[13, 14, 25, 26])
    ids = tok("To be, or not to be, that is the question", return_tensors="pt").input_ids
    logits(model, ids)  # eval first: pairs on shared storage
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    got = logits(model, ids)
    condify.save_pretrained(model, tmp_path)
    torch.testing.assert_close(got, logits(condify.from_pretrained(tmp_path), ids), rtol=0, atol=1e-4)
