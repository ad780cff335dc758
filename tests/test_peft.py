"""PEFT, forward hooks and wrapped projections under every registered method (issue #17, item 2).

The matrix runs over ``condify.list_methods()`` (a method added later is covered by adding nothing), each
on the 6-layer tiny llama with the options of ``test_equivalence`` and its new parameters randomised (so
routing is non-trivial), then LoRA on every PEFT-targetable linear (q/k/v/o/gate/up/down):

- after one backward every LoRA parameter has a nonzero gradient;
- LoRA with B = 0 leaves the logits as they were; a nonzero B on any one projection kind changes them,
  and the adapted model's logits are those of the model with the LoRA delta merged into the weights;
- a forward hook on every targeted module fires, and a hook's edit takes effect exactly as the
  equivalent weight edit does.

Then the expert methods' wrapped-projection path (dynamic-k, lte, mot): with any projection wrapped
(here: an identity hook) every mode computes what the weight-reading fast path computes (outputs,
gradients, executed fraction), on GLU, fused gate_up and Conv1D MLPs; routers are called as modules; a
PEFT adapter on a condify router is refused with a ConfigError naming the fix.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from small import one_thread, small  # noqa: F401 (autouse fixture)
from test_equivalence import OPTIONS, ROUTED
from tiny import tiny

import condify
from condify.methods.dynamic_k.modules import PEFT_EXCLUDE
from condify.methods.dynamic_k.modules import set_mode as dk_set_mode
from condify.methods.lte.modules import set_mode as lte_set_mode
from condify.patching import patched

METHODS = sorted(condify.list_methods())
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 6  # tiny llama


def _randomise_new(model: torch.nn.Module, method: str, seed: int = 1, scale: float = 20.0) -> None:
    """Random values for what ``method`` added (routers, thresholds stay), as test_equivalence does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in patched(model, method):
            for c in m._condify_patch.children:
                for p in m.get_submodule(c).parameters():
                    fan_in = p.shape[-1] if p.dim() > 1 else 1
                    p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5)


def converted(method: str) -> torch.nn.Module:
    model = tiny("llama")
    condify.modify(model, method, **{**OPTIONS.get(method, {}), **ROUTED.get(method, {})})
    _randomise_new(model, method)
    return model.eval()


def ids(b: int = 4, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


def lora(model: torch.nn.Module, **kw) -> torch.nn.Module:
    kw.setdefault("target_modules", TARGETS)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw))


def lora_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def set_lora_b(model: torch.nn.Module, kinds: list[str] | None = None, seed: int = 2) -> None:
    """LoRA B random (std 0.1) on the modules named in ``kinds`` (all if None), zero elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            b = m.lora_B["default"].weight
            on = kinds is None or name.rsplit(".", 1)[-1] in kinds
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1 if on else torch.zeros_like(b))


# ----------------------------------------------------------------------------------------------------------
# the matrix: every registered method
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_peft_lora_every_adapter_gets_gradient(method):
    model = lora(converted(method))
    layers = lora_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == sorted(TARGETS)
    assert len(layers) == len(TARGETS) * LAYERS  # every projection of every layer is adapted
    set_lora_b(model)  # B = 0 at init would give A no gradient
    model.train()
    x = ids()
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(params) == 2 * len(layers)
    dead = [n for n, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"{method}: {len(dead)} LoRA parameters got no gradient, e.g. {dead[:3]}"


@pytest.mark.parametrize("method", METHODS)
def test_peft_lora_changes_logits_as_merging_it_would(method):
    model = converted(method)
    x = ids()
    base = logits(model, x)
    model = lora(model).eval()
    torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)  # B = 0: the same model
    for kind in TARGETS:  # each projection kind's adapter takes effect on its own
        set_lora_b(model, [kind])
        assert not torch.allclose(logits(model, x), base, atol=1e-4), (
            f"{method}: LoRA on {kind} changes nothing"
        )
    set_lora_b(model)
    adapted = logits(model, x)
    merged = model.merge_and_unload()  # the LoRA delta folded into the weights the fast paths read
    assert not lora_layers(merged)
    torch.testing.assert_close(logits(merged, x), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_peft_forward_hooks_on_targets_fire(method):
    model = lora(converted(method)).eval()
    set_lora_b(model)
    calls: Counter[str] = Counter()
    for name, m in lora_layers(model).items():
        m.register_forward_hook(lambda mod, args, out, name=name: calls.update([name]))
    logits(model, ids())
    silent = sorted(set(lora_layers(model)) - set(calls))
    assert not silent, f"{method}: {len(silent)} hooked LoRA modules never ran, e.g. {silent[:3]}"


@pytest.mark.parametrize("method", METHODS)
def test_forward_hooks_on_projections_fire_and_take_effect(method):
    """Without PEFT: an identity hook on every projection fires and changes nothing; a hook doubling
    every down_proj output gives the logits of the model whose down_proj weights are doubled."""
    model = converted(method)
    x = ids()
    base = logits(model, x)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in edited.named_modules():
            if name.endswith("down_proj"):
                m.weight.mul_(2.0)
    want = logits(edited, x)
    projections = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    calls: Counter[str] = Counter()
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: calls.update([name]))
        for name, m in projections.items()
    ]
    torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)
    silent = sorted(set(projections) - set(calls))
    assert not silent, f"{method}: {len(silent)} hooked projections never ran, e.g. {silent[:3]}"
    for h in handles:
        h.remove()
    for name, m in projections.items():
        if name.endswith("down_proj"):
            m.register_forward_hook(lambda mod, args, out: out * 2.0)
    torch.testing.assert_close(logits(model, x), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# the expert methods' wrapped-projection path against their fast path
# ----------------------------------------------------------------------------------------------------------

EXPERT_CASES = [
    *[
        ("dynamic-k", {"expert_size": 8, "tau": 0.5}, mode)
        for mode in ("sparse", "masked", "oracle", "dense")
    ],
    *[("lte", {"expert_size": 8}, mode) for mode in ("hard", "masked", "soft")],
    ("mot", {"num_experts": 4, "group_size": 2}, "mot"),
    ("mot", {"num_experts": 4, "stage": "moe", "top_k": 2}, "moe"),
]
SET_MODE = {"dynamic-k": dk_set_mode, "lte": lte_set_mode}


def _projections(model: torch.nn.Module, method: str) -> list[torch.nn.Module]:
    """Every linear inside the MLPs ``method`` converted (gate/up/down, fused gate_up, Conv1D)."""
    out = []
    for _, mlp in patched(model, method):
        added = set(mlp._condify_patch.children)
        out += [m for n, m in mlp.named_children() if n not in added and hasattr(m, "weight")]
    return out


def _run(model: torch.nn.Module, method: str, x: torch.Tensor, grad: bool):
    """(output, executed fraction, gradients of the MLP weights) of one forward (+ backward)."""
    model.zero_grad(set_to_none=True)
    with condify.track(model) as t, torch.set_grad_enabled(grad):
        out = model(input_ids=x, use_cache=False).logits
    grads = {}
    if grad:
        out.square().mean().backward()
        grads = {
            n: p.grad.clone() for n, p in model.named_parameters() if ".mlp." in n and p.grad is not None
        }
    return out.detach(), t.fraction(method), grads


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize(
    ("method", "opts", "mode"), EXPERT_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_wrapped_projection_path_equals_fast_path(method, opts, mode, kind):
    model = small(kind)
    condify.modify(model, method, **opts)
    _randomise_new(model, method, scale=5.0)
    if method in SET_MODE:
        SET_MODE[method](model, mode)
    x = ids(4, 7)
    for grad in (False, True):  # inference (the fused CPU kernels) and training
        fast = _run(model, method, x, grad)
        calls: Counter[int] = Counter()
        handles = [
            p.register_forward_hook(lambda mod, args, out, i=i, c=calls: c.update([i]))
            for i, p in enumerate(_projections(model, method))
        ]
        try:
            wrapped = _run(model, method, x, grad)
        finally:
            for h in handles:
                h.remove()
        assert len(calls) == len(handles) > 0  # the module path ran
        torch.testing.assert_close(wrapped[0], fast[0], atol=1e-5, rtol=1e-5)
        if mode == "dense":  # dense mode counts nothing, on either path
            assert math.isnan(fast[1]) and math.isnan(wrapped[1])
        else:  # the same executed fraction is counted
            assert wrapped[1] == fast[1] and 0 < fast[1] <= 1
        assert wrapped[2].keys() == fast[2].keys()
        for n in fast[2]:
            torch.testing.assert_close(wrapped[2][n], fast[2][n], atol=1e-5, rtol=1e-4, msg=n)
    if method != "mot" and mode not in ("dense", "soft"):
        assert fast[1] < 1  # routing is not trivial here


def test_dynamic_k_attention_expert_mlps_train_under_lora():
    """dynamic-k with ``attention=True``: LoRA on the converted projections' expert MLPs
    (``expert_mlp.up`` / ``.down``, what runs in place of q/k/v/o) and on the MLPs gets gradient, changes
    the logits, and merging it gives the same logits."""
    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8, tau=0.5, attention=True)
    _randomise_new(model, "dynamic-k")
    x = ids()
    base = logits(model.eval(), x)
    model = lora(
        model, target_modules=["expert_mlp.up", "expert_mlp.down", "gate_proj", "up_proj", "down_proj"]
    )
    assert len(lora_layers(model)) == (4 * 2 + 3) * LAYERS
    set_lora_b(model)
    adapted = logits(model, x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    dead = [n for n, p in model.named_parameters() if "lora_" in n and not bool(p.grad.abs().sum() > 0)]
    assert not dead
    torch.testing.assert_close(logits(model.merge_and_unload(), x), adapted, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# routers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "targets"), [("dynamic-k", ["fc1", "fc2"]), ("lte", ["router"])])
def test_peft_on_a_router_is_refused(method, targets):
    for kw in ({"target_modules": targets}, {"target_modules": "all-linear"}):
        model = lora(converted(method), **kw)
        with pytest.raises(
            condify.ConfigError, match=r"condify routers are not PEFT targets.*exclude_modules"
        ):
            model(input_ids=ids(), use_cache=False)
    if method == "dynamic-k":  # also while tau = 0 leaves the router unused (the error must not wait)
        model = tiny("llama")
        condify.modify(model, method, expert_size=8)
        with pytest.raises(condify.ConfigError, match="condify routers are not PEFT targets"):
            lora(model, target_modules=targets)(input_ids=ids(), use_cache=False)
    model = lora(converted(method), target_modules="all-linear", exclude_modules=PEFT_EXCLUDE)
    assert not any(".router" in n for n in lora_layers(model))
    set_lora_b(model)
    x = ids()
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    assert all(bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if "lora_" in n)


def test_peft_refuses_the_mot_controller_itself():
    """mot's controller is not a Linear: PEFT's own error, before anything is wrapped."""
    with pytest.raises(ValueError, match="Controller.*is not supported"):
        lora(converted("mot"), target_modules=["router"])


@pytest.mark.parametrize("method", ["dynamic-k", "lte", "mot"])
def test_routers_are_called_as_modules(method):
    """A hook on the router fires (the CPU inference path included) and what it returns is the routing."""
    model = converted(method)
    x = ids()
    base = logits(model, x)
    routers = [m.router for _, m in patched(model, method)]
    E = patched(model, method)[0][1]._condify_patch.state.experts
    calls = Counter()
    handles = [
        r.register_forward_hook(lambda mod, a, out, i=i: calls.update([i])) for i, r in enumerate(routers)
    ]
    torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(routers)
    for h in handles:
        h.remove()

    def one_expert(mod, args, out):  # every token's best expert is expert 0, the others score low
        fixed = torch.full_like(out, -10.0 if method == "mot" else 0.0)
        fixed[..., 0] = 1.0
        return fixed

    for r in routers:
        r.register_forward_hook(one_expert)
    with condify.track(model) as t:
        routed = logits(model, x)
    assert not torch.allclose(routed, base, atol=1e-4)
    if method != "mot":  # mot counts top_k experts per token whatever they are
        assert t.fraction(method) == pytest.approx(1 / E)  # lte: only expert 0 reaches the threshold


# ----------------------------------------------------------------------------------------------------------
# converting or restoring around PEFT: the neuron permutation cannot follow an adapter's own weights
# ----------------------------------------------------------------------------------------------------------

EXPERT_OPTIONS = {"dynamic-k": {"expert_size": 8, "clustering": "gate"}, "lte": {"expert_size": 8},
                  "mot": {"num_experts": 4}}  # fmt: skip


@pytest.mark.parametrize("method", list(EXPERT_OPTIONS))
def test_modify_refuses_mlps_wrapped_by_peft(method):
    inner = lora(tiny("llama"), target_modules=["up_proj"]).base_model.model
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    with pytest.raises(
        condify.ModifyError, match=r"up projection is a peft\..*not a plain nn.Linear.*Convert first"
    ):
        condify.modify(inner, method, **EXPERT_OPTIONS[method])
    after = inner.state_dict()
    assert not patched(inner) and not hasattr(inner.config, "condify")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("method", list(EXPERT_OPTIONS))
def test_unmodify_refuses_mlps_wrapped_by_peft_until_merged(method):
    model = tiny("llama")
    condify.modify(model, method, **EXPERT_OPTIONS[method])
    peft = lora(model)
    set_lora_b(peft)
    x = ids()
    adapted = logits(peft, x)
    with pytest.raises(condify.ModifyError, match=r"merge_and_unload"):
        condify.unmodify(model)
    assert patched(model, method) and condify.applied_configs(model)[0].method == method
    torch.testing.assert_close(logits(peft, x), adapted, atol=0, rtol=0)  # nothing changed
    merged = peft.merge_and_unload()
    condify.unmodify(merged)
    assert not patched(merged)
    if method != "mot":  # dense at init: the restored dense model computes what the adapted one did
        torch.testing.assert_close(logits(merged, x), adapted, atol=1e-4, rtol=1e-4)
