"""condify in a user's own training loop (``condify.integrations``), for every registered method:

- the HF ``Trainer`` (``CondifyTrainer``) and an ``accelerate`` loop train a converted tiny llama for 3
  steps: the loss is finite, trainable parameters change, and the method's per-step maintenance is seen
  (mod-threshold: the keep-rate walks to ``capacity``; lte: the executed fraction walks to the target);
  methods without such terms add exactly zero and their step is a no-op;
- ``condify.training_loss`` equals the calibrate term recomputed by hand (lte's soft stage) and reaches
  the routers; ``CondifyTrainer`` scales it for gradient accumulation like the task loss;
- bad use gets a condify error before anything changes; a copy of an attached model carries nothing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from small import one_thread  # noqa: F401 (autouse: one thread)
from test_equivalence import OPTIONS
from tiny import tiny

import condify
from condify import registry
from condify.convert import ModifyError
from condify.integrations import attach, attached, converted_model, detach, step
from condify.methods.lte import modules as lte_modules
from condify.methods.mod_threshold import keep_rates
from condify.methods.mod_threshold.routing import init_routers
from condify.patching import patched

METHODS = sorted(condify.list_methods())
STEPS = 3
CAPACITY = 0.5  # mod-threshold's target keep-rate in these tests
LTE_TARGET = 0.5  # lte's target sparsity (executed 0.5)


def _ids(b: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def converted(method: str) -> torch.nn.Module:
    """A tiny llama converted by ``method`` with its new parameters randomised (routing non-trivial) and,
    where the method holds a target during training, started far from it."""
    model = tiny("llama")
    extra = {"mod-threshold": {"capacity": CAPACITY}, "dynamic-k": {"tau": 0.5}}.get(method, {})
    condify.modify(model, method, **{**OPTIONS.get(method, {}), **extra})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in patched(model, method):
            for c in m._condify_patch.children:
                for p in m.get_submodule(c).parameters():
                    if p.dim() > 1:
                        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * 3.0)
                    else:
                        p.zero_()
    if method == "mod-threshold":  # calibrate's training-free init, then biases +2: far above the capacity
        init_routers(model, [{"input_ids": _ids(4, 16, 7)}])
        with torch.no_grad():
            for _, m in patched(model, method):
                m.router.bias += 2.0
    if method == "lte":  # threshold 0.2: most experts run, far above the target's 0.5
        lte_modules.set_threshold(model, 0.2)
    return model


def measured(method: str, model: torch.nn.Module, batch: torch.Tensor) -> float | None:
    """What the method's maintenance holds, measured on ``batch`` in eval mode (None: nothing held)."""
    was = model.training
    model.eval()
    try:
        if method == "mod-threshold":
            rates = keep_rates(model, [batch])
            return sum(rates.values()) / len(rates)
        if method == "lte":
            with torch.no_grad(), condify.track(model) as t:
                model(batch, use_cache=False)
            return t.fraction("lte")
        return None
    finally:
        model.train(was)


TARGETS = {"mod-threshold": CAPACITY, "lte": 1 - LTE_TARGET}
ATTACH_OPTIONS = {"lte": {"lte": {"target_sparsity": LTE_TARGET}}}


def check_trained(method: str, model, before: dict, held_before: float | None, batch, losses, statuses):
    """Finite losses, changed trainable parameters, and the maintenance effect (or none)."""
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed"
    assert any(".router." not in n for n in changed), changed  # the model's own weights train
    if registry.get(method).training is None:
        assert all(s == {} for s in statuses), statuses
        return
    assert method in TARGETS, f"{method} has training hooks: add what they hold to TARGETS"
    target, now = TARGETS[method], measured(method, model, batch)
    assert abs(now - target) < 0.7 * abs(held_before - target), (method, held_before, now, target)
    assert all(statuses), statuses


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _Data(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_hf_trainer_trains_every_method(method, tmp_path):
    from condify.integrations import CondifyTrainer

    model = converted(method)
    batch = _ids(4, 16)
    before, held = _snapshot(model), measured(method, model, batch)
    statuses: list[dict] = []
    trainer = CondifyTrainer(
        model=model, args=_args(tmp_path), train_dataset=_Data(batch),
        condify_options=ATTACH_OPTIONS.get(method),
    )  # fmt: skip
    orig = trainer.condify_callback.on_step_end

    def spy(*a, **kw):
        orig(*a, **kw)
        statuses.append(dict(trainer.condify_callback.last))

    trainer.condify_callback.on_step_end = spy
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    check_trained(method, model, before, held, batch, losses, statuses)
    assert attached(model) is None  # the callback detached what it attached
    if statuses[-1]:
        logged = [h for h in trainer.state.log_history if "loss" in h][-1]
        assert any(k.startswith(f"condify/{method}/") for k in logged), logged


@pytest.mark.parametrize("method", METHODS)
def test_accelerate_loop_trains_every_method(method):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = converted(method)
    batch = _ids(4, 16)
    before, held = _snapshot(model), measured(method, model, batch)
    attach(model, ATTACH_OPTIONS.get(method))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_Data(batch), batch_size=4)
    wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    wrapped.train()
    losses, statuses = [], []
    for _ in range(STEPS):
        for b in loader:
            loss = wrapped(**b).loss + condify.training_loss(wrapped)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            statuses.append(step(wrapped))
            losses.append(loss.item())
    check_trained(method, accelerator.unwrap_model(wrapped), before, held, batch, losses, statuses)
    assert detach(model) and attached(model) is None


@pytest.mark.parametrize("method", [m for m in METHODS if registry.get(m).training is None])
def test_training_loss_is_zero_without_terms(method):
    model = converted(method).train()
    x = _ids()
    assert condify.training_loss(model).item() == 0.0  # not attached: nothing to record
    attach(model)
    loss = model(x, labels=x).loss
    aux = condify.training_loss(model)
    assert aux.shape == () and aux.item() == 0.0 and step(model) == {}
    assert torch.equal(loss + aux, loss)


def test_training_loss_of_a_dense_model_is_zero():
    assert condify.training_loss(tiny("llama")).item() == 0.0


def test_lte_soft_loss_equals_calibrate_term_and_reaches_routers():
    model = converted("lte").train()
    x = _ids()
    tau = float(patched(model, "lte")[0][1].expert_layout.tau)
    with lte_modules.mode(model, "soft"), lte_modules.recording(model) as recs:
        model(x, use_cache=False)
    s = torch.cat([torch.cat(r).flatten() for r in recs])
    eta, sep = 0.3, 0.2
    ref = eta * s.mean() + sep * (0.01 / ((s - tau) ** 2 + 0.01)).mean()  # LTE's eta * mean(s) + separation
    attach(model, {"lte": {"eta": eta, "separation": sep, "target_sparsity": LTE_TARGET}})
    with lte_modules.mode(model, "soft"):
        model(x, use_cache=False)
        aux = condify.training_loss(model)
        torch.testing.assert_close(aux, ref.float(), rtol=1e-6, atol=1e-7)
        assert torch.equal(condify.training_loss(model), aux)  # reading it twice changes nothing
        aux.backward()
        assert all(m.router.weight.grad.abs().sum() > 0 for _, m in patched(model, "lte"))
        executed = float((s >= tau).float().mean())
        status = step(model)
    assert status["lte/executed"] == pytest.approx(executed)
    assert status["lte/eta"] == pytest.approx(eta * math.exp(5.0 * (executed - (1 - LTE_TARGET))))
    with lte_modules.mode(model, "soft"):
        assert (
            condify.training_loss(model).item() == 0.0
        )  # consumed by the step; the next forward records anew


def test_condify_trainer_scales_the_aux_loss_for_gradient_accumulation(tmp_path):
    from condify.integrations import CondifyTrainer

    model = converted("lte").train()
    x = _ids()
    trainer = CondifyTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2),
                             train_dataset=_Data(x))  # fmt: skip
    attach(model, {"lte": {"target_sparsity": LTE_TARGET}})
    inputs = {"input_ids": x, "labels": x}
    n = x[:, 1:].numel()
    with lte_modules.mode(model, "soft"):
        base, mean = model(**inputs, num_items_in_batch=n).loss, model(**inputs).loss
        aux = condify.training_loss(model)
        assert aux.item() > 0
        trainer.current_gradient_accumulation_steps = 2
        scaled = trainer.compute_loss(model, dict(inputs), num_items_in_batch=n)  # normalised over the window
        plain = trainer.compute_loss(model, dict(inputs))  # per-batch mean: the Trainer divides it later
        model.eval()
        evaluated = trainer.compute_loss(model, dict(inputs))  # evaluation: the task loss only
        task = model(**inputs).loss
    torch.testing.assert_close(scaled, base + aux / 2)
    torch.testing.assert_close(plain, mean + aux)
    torch.testing.assert_close(evaluated, task)


def test_training_terms_need_attach():
    model = converted("mod-threshold").train()
    x = _ids()
    model(x, labels=x)
    with pytest.raises(ModifyError, match="attach"):
        condify.training_loss(model)
    with pytest.raises(ModifyError, match="attach"):
        step(model)
    with pytest.raises(ModifyError, match="converted by condify"):
        attach(tiny("llama"))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lte": {"eta": 0.1}}, "not applied"),
        ({"mod-threshold": {"steps": 3}}, "bias_momentum"),
        ({"mod-threshold": {"bias_momentum": 1.5}}, "bias_momentum"),
        ({"mod-threshold": 0.5}, "map a method name"),
    ],
)
def test_attach_refuses_bad_options_before_any_change(options, match):
    model = converted("mod-threshold")
    hooks = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    with pytest.raises(condify.ConfigError, match=match):
        attach(model, options)
    assert attached(model) is None
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    assert patched(model, "mod-threshold")[0][1]._condify_patch.state.shared.record is None


def test_attach_is_idempotent_and_detach_restores():
    model = converted("lte")
    hooks = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    s = attach(model, {"lte": {"eta": 0.2}})
    assert attach(model) is s and attach(model, {"lte": {"eta": 0.2}}) is s
    with pytest.raises(condify.ConfigError, match="detach"):
        attach(model, {"lte": {"eta": 0.3}})
    assert detach(model) and not detach(model)
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    assert all(m._condify_patch.state.record is None for _, m in patched(model, "lte"))
    with attach(model):  # a context manager too
        assert attached(model) is not None
    assert attached(model) is None
    attach(model)
    condify.unmodify(model)
    assert detach(model)  # after unmodify too: the dense model is left as it came
    assert all(dict(m._forward_pre_hooks) == hooks[n] for n, m in model.named_modules())
    assert "_condify_training" not in model.__dict__


def test_an_attached_model_copies_and_calibrates():
    model = converted("mod-threshold").train()
    x = _ids()
    attach(model)
    model(x, labels=x).loss.backward()  # records now hold tensors with a graph
    twin = copy.deepcopy(model)
    assert (
        attached(twin) is None
        and patched(twin, "mod-threshold")[0][1]._condify_patch.state.shared.record is None
    )
    twin(x)  # the copied hook does nothing in the copy
    assert attached(model).hooks["mod-threshold"].rec  # the original's records are intact
    res = condify.calibrate(model, [_ids(4, 32, s) for s in range(3)], capacity=CAPACITY, steps=2,
                            router_steps=0, holdout=[_ids(4, 32, 9)], progress=False)  # fmt: skip
    assert len(res["losses"]) == 2 and all(abs(r - CAPACITY) <= 0.05 for r in res["keep_rates"].values())
    model(x)
    assert attached(model).hooks["mod-threshold"].rec  # recording again after calibrate


def test_converted_model_unwraps_peft_and_compile():
    from peft import LoraConfig, get_peft_model

    model = converted("layer-parallel")
    assert converted_model(torch.compile(model)) is model
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert converted_model(peft_model) is model
    assert converted_model(tiny("llama")) is None
    attach(peft_model)
    assert attached(model) is attached(peft_model) is not None


def test_fsdp_units_keep_a_layer_parallel_pair_in_one_unit():
    from condify.integrations import fsdp_units

    model = converted("layer-parallel")  # pairs=1, start=2: layers 2 and 3 run as one pair
    layers = list(model.model.layers)
    units = fsdp_units(model)
    assert [[layers.index(m) for m in u] for u in units] == [[0], [1], [2, 3], [4], [5]]
    assert [len(u) for u in fsdp_units(converted("dynamic-k"))] == [1] * 6


def test_registry_refuses_training_hooks_without_their_options():
    from condify.methods.mod_threshold import ModThresholdCalibration, ModThresholdConfig
    from condify.methods.mod_threshold.calibrate import CapacityHold

    spec = registry.get("mod-threshold")
    common = dict(
        name="x", description="", config_cls=ModThresholdConfig, targets=spec.targets, patch=spec.patch
    )
    with pytest.raises(ValueError, match="has none"):
        registry.Method(**common, training=CapacityHold)
    with pytest.raises(ValueError, match="not calibrate options"):
        registry.Method(
            **common, options=ModThresholdCalibration, training=CapacityHold, training_options=("nope",)
        )


def test_condify_trainer_on_an_attached_model_refuses_other_options(tmp_path):
    """The callback attaches only a model that is not attached, and never drops options silently: other
    options than the attached session's are refused; the same (or none) train under that session."""
    from condify.integrations import CondifyTrainer

    model = converted("lte")
    session = attach(model, {"lte": {"eta": 0.2}})
    batch = _ids(4, 16)
    trainer = CondifyTrainer(model=model, args=_args(tmp_path), train_dataset=_Data(batch),
                             condify_options={"lte": {"eta": 0.3}})  # fmt: skip
    with pytest.raises(condify.ConfigError, match="already attached"):
        trainer.train()
    assert attached(model) is session
    trainer = CondifyTrainer(model=model, args=_args(tmp_path), train_dataset=_Data(batch))
    trainer.train()
    assert attached(model) is session  # not the callback's to detach
    detach(model)
