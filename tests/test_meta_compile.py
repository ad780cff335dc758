"""Big-model loading and torch.compile for the expert methods (dynamic-k, lte, mot; issue #17 items 3-4).

- meta device: ``condify.modify`` on a model built under ``accelerate.init_empty_weights()`` builds the
  structure without materialising anything, a forward on meta tensors gives the right shapes, and
  accelerate's ``load_checkpoint_and_dispatch`` of a condify checkpoint into it gives the saved model's
  logits (then ``unmodify`` gives the dense weights): the ``device_map`` / ``low_cpu_mem_usage`` path;
- ``torch.compile(model, fullgraph=True)``: the converted model traces in one graph (no graph break),
  with inductor, and matches eager logits and gradients, PEFT-wrapped projections included; a batch that
  the MoT stage cannot group fails with mot's own message.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from peft import LoraConfig, get_peft_model
from small import one_thread, small, snapshot  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

import condify
from condify.patching import patched

CASES = {
    "dynamic-k": ("dynamic-k", {"expert_size": 8, "tau": 0.5}),
    "lte": ("lte", {"expert_size": 8}),
    "mot": ("mot", {"num_experts": 4, "group_size": 2}),
    "mot-moe": ("mot", {"num_experts": 4, "stage": "moe", "top_k": 2}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def ids(b: int = 4, t: int = 7, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed)).to(device)


def converted(case: str) -> torch.nn.Module:
    """The small llama converted with ``case``, its new parameters random (routing is non-trivial)."""
    method, opts = CASES[case]
    model = small("llama")
    condify.modify(model, method, **opts)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in patched(model, method):
            for c in m._condify_patch.children:
                for p in m.get_submodule(c).parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 5.0 / p.shape[-1] ** 0.5)
    return model.eval()


def empty_llama() -> torch.nn.Module:
    """The small llama's architecture under ``init_empty_weights`` (eager attention: transformers' sdpa
    mask code reads mask values, which meta tensors do not have)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(small("llama").config, attn_implementation="eager").eval()


def meta(how: str, case: str) -> torch.nn.Module:
    """A model without weights, converted with ``case``: built under ``init_empty_weights`` then
    modified, a dense model moved ``.to("meta")`` then modified, or a converted model moved to meta."""
    method, opts = CASES[case]
    if how == "converted.to(meta)":
        model = converted(case)
        model.set_attn_implementation("eager")
        return model.to("meta")
    if how == "init_empty_weights":
        model = empty_llama()
    else:
        model = small("llama")
        model.set_attn_implementation("eager")
        model.to("meta")
    condify.modify(model, method, **opts)
    return model


@pytest.mark.parametrize("how", ["init_empty_weights", ".to(meta)", "converted.to(meta)"])
@pytest.mark.parametrize("case", list(CASES))
def test_modify_and_forward_on_the_meta_device(case, how):
    method, _ = CASES[case]
    model = meta(how, case)
    assert condify.applied_configs(model)[0].method == method
    added = [
        t
        for _, m in patched(model, method)
        for c in m._condify_patch.children
        for t in [*m.get_submodule(c).parameters(), *m.get_submodule(c).buffers()]
    ]
    assert added and all(t.device.type == "meta" for t in added)  # nothing materialised
    assert all(p.device.type == "meta" for p in model.parameters())
    x = ids(device="meta")
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    assert out.device.type == "meta" and out.shape == (4, 7, 128)
    condify.unmodify(model)  # and back, on meta too
    assert not patched(model) and not hasattr(model.config, "condify")


@pytest.mark.parametrize("case", list(CASES))
def test_meta_converted_model_loads_a_checkpoint_with_accelerate(case, tmp_path):
    method, opts = CASES[case]
    real = converted(case)
    condify.save_pretrained(real, tmp_path)
    model = empty_llama()
    condify.modify(model, method, **opts)
    load_checkpoint_and_dispatch(model, str(tmp_path), device_map={"": "cpu"})
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    x = ids()
    with torch.no_grad():
        want = real(input_ids=x, use_cache=False).logits
        got = model.eval()(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    condify.unmodify(model)
    dense = snapshot(small("llama"))
    state = model.state_dict()
    assert state.keys() == dense.keys() and all(torch.equal(state[k], dense[k]) for k in dense)


def _eager_and_compiled(model: torch.nn.Module, x: torch.Tensor, backend: str = "inductor"):
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits, compiled(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("case", list(CASES))
def test_compile_fullgraph_matches_eager(case):
    method, _ = CASES[case]
    model = converted(case)
    x = ids()
    eager, compiled = _eager_and_compiled(model, x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # training: one graph through the custom ops' autograd, the same gradients as eager
    model.train()
    grads = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        fn(input_ids=x, labels=x, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".mlp." in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("case", ["dynamic-k", "lte", "mot"])
def test_compile_fullgraph_with_peft_lora_matches_eager(case):
    """The wrapped-projection path (LoRA on every projection) traces in one graph too."""
    model = get_peft_model(converted(case), LoraConfig(target_modules=TARGETS, r=4, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    eager, compiled = _eager_and_compiled(model.eval(), ids(), backend="aot_eager")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compile_mot_ragged_batch_matches_eager():
    """A batch of 3 with G = 2 ends in a group of one; compiled with fullgraph it equals eager."""
    mlp = patched(converted("mot"), "mot")[0][1]
    x = torch.randn(3, 5, 32)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(mlp, fullgraph=True, backend="eager")(x), mlp(x))
