"""Issue #18: a refused call never changes the model, and every bad input gets condify's own clear error.

Every case asserts the error type (condify's own: ConfigError, ModifyError, CheckpointError,
UnsupportedModelError, DataError), that the message names the problem, and that the model (module tree,
tensors, config.condify, train/eval modes, requires_grad, patch state) and the files involved (listing and
bytes) are exactly as before. Cases that loop over ``condify.registry.all_methods()`` cover methods added
later. Sections: API entry points, options, calibration data, checkpoints, CLI.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny

import condify
from condify import cli, registry
from condify.patching import patched

METHODS = [m.name for m in registry.all_methods()]
CALIBRATED = [m.name for m in registry.all_methods() if m.calibrate is not None]
# options that convert something on the 6-layer tiny llama (intermediate size 96) quickly
TINY_OPTIONS = {
    "layer-parallel": {"pairs": 1, "start": 2},
    "dynamic-k": {"expert_size": 8},
    "lte": {"expert_size": 8},
    "mot": {"num_experts": 4, "stage": "moe"},  # token choice: any batch size
}
VOCAB = 128

ERRORS = (
    condify.ConfigError,
    condify.ModifyError,
    condify.CheckpointError,
    condify.UnsupportedModelError,
    condify.DataError,
)


# ----------------------------------------------------------------------------------------------------------
# helpers: what "unchanged" means
# ----------------------------------------------------------------------------------------------------------


def state_of(model: torch.nn.Module) -> dict:
    """Everything a refused call must leave as it was."""
    return {
        "tree": repr(model),
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "condify": copy.deepcopy(getattr(model.config, "condify", None)),
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "patches": {n: (m._condify_patch.method, m._condify_patch.children) for n, m in patched(model)},
        "forwards": sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = state_of(model)
    assert after["tree"] == before["tree"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        now = after["tensors"][k]
        assert now.dtype == v.dtype and now.shape == v.shape, k
        assert torch.equal(now, v) or (
            torch.isnan(v).any() and torch.equal(now.nan_to_num(), v.nan_to_num())
        ), k
    for key in ("condify", "training", "requires_grad", "patches", "forwards", "hooks"):
        assert after[key] == before[key], key


def files_of(path: Path) -> dict[str, bytes] | None:
    """Relative path -> bytes of every file under ``path`` (None if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(error: type[Exception], match: str, fn, *args, model=None, files=(), **kwargs):
    """Call ``fn``; assert it raises ``error`` matching ``match`` and changes neither ``model`` nor ``files``."""
    before = state_of(model) if model is not None else None
    before_files = {str(f): files_of(f) for f in files}
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ERRORS), f"not one of condify's errors: {type(info.value)}"
    if model is not None:
        assert_unchanged(model, before)
    for f, snap in before_files.items():
        assert files_of(Path(f)) == snap, f"{f} changed"
    return info.value


def converted(method: str, **overrides) -> torch.nn.Module:
    model = tiny("llama", **overrides)
    return condify.modify(model, method, **TINY_OPTIONS.get(method, {}))


def ids(b: int = 2, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def good_data(n: int = 3) -> list[torch.Tensor]:
    return [ids(seed=i) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# API entry points
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda: condify.describe(None), "describe: expected a transformers PreTrainedModel, got NoneType"),
        (lambda: condify.unmodify(None), "unmodify: expected a transformers PreTrainedModel, got NoneType"),
        (lambda: condify.modify(None, "dynamic-k"), "modify: expected a transformers PreTrainedModel"),
        (lambda: condify.modify(torch.nn.Linear(2, 2), "dynamic-k"), "got Linear"),
        (lambda: condify.applied_configs("model"), "expected a transformers PreTrainedModel, got str"),
        (lambda: condify.calibrate(None, good_data()), "expected a transformers PreTrainedModel"),
    ],
    ids=["describe-None", "unmodify-None", "modify-None", "modify-Linear", "applied-str", "calibrate-None"],
)
def test_not_a_model(fn, match):
    refused(condify.ModifyError, match, fn)


@pytest.mark.parametrize(
    ("method", "match"),
    [
        (None, "`method` must be a method name .* got None .*known methods"),
        (3, "`method` must be a method name .* got 3 \\(int\\)"),
        ("no-such-method", "unknown method 'no-such-method'; known methods"),
        ("", "unknown method ''"),
        (["dynamic-k"], "got \\['dynamic-k'\\] \\(list\\)"),
    ],
)
def test_bad_method_name(method, match):
    model = tiny("llama")
    refused(condify.ConfigError, match, condify.modify, model, method, model=model)


def test_config_object_and_options_refused():
    from condify.methods.layer_parallel import LayerParallelConfig

    model = tiny("llama")
    refused(
        condify.ConfigError, "either a config object or keyword options", condify.modify, model,
        LayerParallelConfig(pairs=1), start=2, model=model,
    )  # fmt: skip


def test_unmodify_dense_and_wrong_method():
    model = tiny("llama")
    refused(condify.ModifyError, "not modified by condify", condify.unmodify, model, model=model)
    condify.modify(model, "layer-parallel", pairs=1, start=2)
    refused(
        condify.ModifyError, "'dynamic-k' is not applied", condify.unmodify, model, "dynamic-k", model=model
    )


@pytest.mark.parametrize("method", METHODS)
def test_modify_twice_refused(method):
    model = converted(method)
    refused(
        condify.ModifyError, f"already modified with '{method}'", condify.modify, model, method, model=model
    )


@pytest.mark.parametrize("method", METHODS)
def test_unmodify_after_a_child_was_deleted(method):
    """Damage (issue #18): unmodify after a router child was deleted stopped half way."""
    model = converted(method)
    sites = [(p, m) for p, m in patched(model) if m._condify_patch.children]
    if not sites:
        pytest.skip(f"{method} adds no child modules")
    path, module = sites[-1]
    child = module._condify_patch.children[0]
    delattr(module, child)
    refused(
        condify.ModifyError, f"{path!r} .* has lost \\['{child}'\\]", condify.unmodify, model, model=model
    )


@pytest.mark.parametrize("method", METHODS)
def test_unmodify_after_the_patches_were_stripped(method):
    model = converted(method)
    for _, m in patched(model):
        del m.__dict__["_condify_patch"]
    refused(condify.ModifyError, "no module is converted by it", condify.unmodify, model, model=model)


def _poison(model: torch.nn.Module) -> str:
    """NaN in every decoder layer's MLP and attention weights; returns the first poisoned name."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[0, 0] = float("nan")
            layer.self_attn.q_proj.weight[0, 0] = float("inf")
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear) and m.out_features == 1:  # routers of gated layers
                    m.weight[0, 0] = float("nan")
    return "model.layers"


@pytest.mark.parametrize("method", METHODS)
def test_modify_refuses_non_finite_weights(method):
    """Silent (issue #18): k-means on NaN weights."""
    model = tiny("llama")
    _poison(model)
    err = refused(
        condify.ModifyError, "holds 1 non-finite value", condify.modify, model, method,
        **TINY_OPTIONS.get(method, {}), model=model,
    )  # fmt: skip
    assert "'model.layers." in str(err) and "NaN/inf" in str(err)


@pytest.mark.parametrize("method", CALIBRATED)
def test_calibrate_refuses_non_finite_weights(method):
    """Damage (issue #18): a NaN weight made mod-threshold overwrite its routers, then blame the lr."""
    model = converted(method)
    _poison(model)
    err = refused(condify.ModifyError, "calibrate: parameter '.*' holds", condify.calibrate, model, good_data(),
                  progress=False, model=model)  # fmt: skip
    assert "learning rate" not in str(err)


def test_calibrate_needs_a_modified_model_and_an_applied_method():
    model = tiny("llama")
    refused(condify.ModifyError, "call condify.modify", condify.calibrate, model, good_data(), model=model)
    condify.modify(model, "layer-parallel", pairs=1, start=2)
    refused(
        condify.ModifyError, "'mod-threshold' is not applied", condify.calibrate, model, good_data(),
        method="mod-threshold", model=model,
    )  # fmt: skip


class _Weird(torch.nn.Module):
    """A llama MLP whose forward swaps the roles of gate and up: same names, another function."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def _unknown(model):
    model.config.model_type = "mystery"  # no adapter names it: the structural fallback decides
    return model


@pytest.mark.parametrize("method", METHODS)
def test_structural_fallback_refuses_what_it_cannot_reproduce(method):
    model = _unknown(tiny("llama"))
    model.model.layers[3].mlp = _Weird(model.model.layers[3].mlp)
    refused(
        condify.UnsupportedModelError, "does not reproduce decoder layer 3 .*MLP output", condify.modify, model,
        method, **TINY_OPTIONS.get(method, {}), model=model,
    )  # fmt: skip


def test_structural_fallback_refuses_a_parallel_residual_block():
    import types

    model = _unknown(tiny("llama"))
    layer = model.model.layers[1]

    def parallel(self, hidden_states, *args, **kwargs):  # GPT-J style: x + attn(n(x)) + mlp(n2(x))
        kwargs.pop("use_cache", None)
        a = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        return hidden_states + a + self.mlp(self.post_attention_layernorm(hidden_states))

    layer.forward = types.MethodType(parallel, layer)
    refused(
        condify.UnsupportedModelError, "does not reproduce decoder layer 1 .*MLP input", condify.modify, model,
        "dynamic-k", expert_size=8, model=model,
    )  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_structural_fallback_accepts_an_exact_view(method, tmp_path):
    model = _unknown(tiny("llama"))
    x = ids()
    with torch.no_grad():
        dense = model(x).logits
    before = state_of(model)
    condify.modify(model, method, **TINY_OPTIONS.get(method, {}))
    assert condify.describe(model).count("model.layers.") >= 1
    condify.unmodify(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "granite", "starcoder2", "llama"])
def test_structural_fallback_finds_the_adapters_view(arch):
    """Sandwich norms, post-norms, a residual scale and a plain MLP are found from the module tree alone: the view the
    fallback verifies is the architecture's adapter (its name and the fields only data can give aside)."""
    import dataclasses

    from condify.adapters import ADAPTERS, get_adapter

    found = get_adapter(_unknown(tiny(arch)))
    want = dataclasses.replace(ADAPTERS[arch], norm_offset=0.0, qk_norm=False, fusable=False)
    assert dataclasses.replace(found, name=want.name) == want


def test_unsupported_meta_model_for_the_fallback():
    with torch.device("meta"):
        model = _unknown(tiny("llama"))
    refused(condify.UnsupportedModelError, "meta device", condify.modify, model, "dynamic-k", expert_size=8)


# ----------------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------------

OPTION_CASES = [
    # silent before (issue #18)
    ("layer-parallel", {"pairs": True}, "`pairs` must be int \\(>= 1\\), got True \\(bool\\)"),
    ("layer-parallel", {"fuse": "no"}, "`fuse` must be bool, got 'no' \\(str\\)"),
    ("dynamic-k", {"attention": "yes"}, "`attention` must be bool, got 'yes'"),
    ("mod-threshold", {"init_bias": float("nan")}, "`init_bias` must be a finite number, got nan"),
    ("mod-threshold", {"sink_tokens": 10**12}, "`sink_tokens` must be an integer >= 0 and <= 1048576"),
    ("layer-parallel", {"layers": [1, 2], "pairs": 2}, "`layers=\\[1, 2\\]` conflicts with pairs=2"),
    ("layer-parallel", {"layers": [1, 2], "start": 3}, "`layers=\\[1, 2\\]` conflicts with start=3"),
    ("dynamic-k", {"layers": [], "expert_size": 8}, "`layers` is empty \\(selects no layer\\)"),
    ("mod-threshold", {"layers": []}, "`layers` is empty"),
    ("layer-parallel", {"layers": []}, "`layers` is empty"),
    # unclear before: wrong types and ranges, each message names option, value, allowed range
    ("layer-parallel", {"pairs": "2"}, "`pairs` must be int \\(>= 1\\), got '2' \\(str\\)"),
    ("layer-parallel", {"pairs": 0}, "`pairs` must be an integer >= 1, got 0"),
    ("layer-parallel", {"pairs": 1.5}, "`pairs` must be int .*got 1.5 \\(float\\)"),
    ("layer-parallel", {"pairs": 4}, "`pairs=4` pairs \\(8 layers\\) do not fit in a model with 6 layers"),
    ("layer-parallel", {"start": -1}, "`start` must be an integer >= 0, got -1"),
    ("layer-parallel", {"pairs": 1, "start": 5}, "1 pairs starting at layer 5 do not fit"),
    (
        "layer-parallel",
        {"layers": [1, 2, 4]},
        "contiguous range of even length|must list pairs of adjacent layers",
    ),
    ("layer-parallel", {"layers": [8, 9]}, "1 pairs starting at layer 8 do not fit in a model with 6 layers"),
    ("mod-threshold", {"init_bias": float("inf")}, "`init_bias` must be a finite number, got inf"),
    ("mod-threshold", {"init_bias": "5"}, "`init_bias` must be float .*got '5' \\(str\\)"),
    ("mod-threshold", {"sink_tokens": -1}, "`sink_tokens` must be an integer >= 0"),
    ("mod-threshold", {"threshold": 0.0}, "`threshold` must be a number > 0.0 and < 1.0, got 0.0"),
    ("mod-threshold", {"threshold": 1.5}, "`threshold` must be a number > 0.0 and < 1.0, got 1.5"),
    ("mod-threshold", {"capacity": 0}, "`capacity` must be a number > 0.0 and <= 1.0, got 0"),
    ("mod-threshold", {"mode": "fast"}, "`mode` must be one of \\('gather', 'mask'\\), got 'fast'"),
    ("mod-threshold", {"debug_checks": 1}, "`debug_checks` must be bool, got 1 \\(int\\)"),
    ("mod-threshold", {"layers": [10]}, "layer indices \\[10\\] are out of range"),
    ("mod-threshold", {"layers": [1, 1]}, "`layers` has duplicates"),
    ("mod-threshold", {"layers": "1,3"}, "`layers` must be a list of layer indices, got '1,3'"),
    ("mod-threshold", {"layers": [True]}, "`layers` must be a list of layer indices"),
    ("dynamic-k", {"tau": "0.1"}, "`tau` must be float \\(>= 0.0 and <= 1.0\\), got '0.1'"),
    ("dynamic-k", {"tau": 2.0}, "`tau` must be a number >= 0.0 and <= 1.0, got 2.0"),
    ("dynamic-k", {"expert_size": 0}, "`expert_size` must be an integer >= 1, got 0"),
    ("dynamic-k", {"expert_size": 7}, "expert_size=7 does not divide the MLP intermediate size 96"),
    ("dynamic-k", {"clustering": "random"}, "`clustering` must be one of \\('gate', 'coactivation'\\)"),
    ("dynamic-k", {"router_width": 0}, "`router_width` must be an integer >= 1"),
    ("dynamic-k", {"attention_width": 0.0, "attention": True}, "`attention_width` must be a number > 0.0"),
    ("dynamic-k", {"attention_expert_size": 8}, "attention_expert_size=8 only applies with `attention=True`"),
    ("dynamic-k", {"attention_width": 2.0}, "attention_width=2.0 only applies with `attention=True`"),
    ("dynamic-k", {"target_sparsity": 1.0}, "`target_sparsity` must be a number >= 0.0 and < 1.0"),
]


@pytest.mark.parametrize(("method", "options", "match"), OPTION_CASES)
def test_bad_option(method, options, match):
    model = tiny("llama")
    err = refused(condify.ConfigError, match, condify.modify, model, method, model=model, **options)
    assert str(err).startswith(method) or "layer indices" in str(err) or "expert_size" in str(err)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bogus": 1}, "unknown options \\['bogus'\\]; known options"),
        ({"layers": []}, "`layers` is empty"),
        (
            {"layers": [99]},
            "layer indices \\[99\\] are out of range|contiguous range of even length, got \\[99\\]|pairs of adjacent layers .*got \\[99\\]",
        ),
        (
            {"layers": [-1]},
            "layer indices \\[-1\\] are out of range|contiguous range of even length|pairs of adjacent layers",
        ),
        ({"layers": "0"}, "`layers` must be a list of layer indices"),
        ({"version": 99}, "unknown options \\['version'\\]"),
    ],
    ids=["unknown", "empty-layers", "layer-99", "layer-neg", "layers-str", "version"],
)
def test_bad_option_every_method(method, options, match):
    model = tiny("llama")
    refused(condify.ConfigError, match, condify.modify, model, method, model=model, **options)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_default_layer_set_on_small_models_converts_something_or_refuses(method, num_layers):
    """Silent (issue #18): default layer sets that gate nothing on 1-2-layer models."""
    model = tiny("llama", num_hidden_layers=num_layers)
    before = state_of(model)
    opts = {k: v for k, v in TINY_OPTIONS.get(method, {}).items() if k not in ("pairs", "start")}
    try:
        condify.modify(model, method, **opts)
    except (condify.ConfigError, condify.ModifyError) as e:
        assert f"{num_layers} layer" in str(e)
        assert_unchanged(model, before)
        return
    assert patched(model, method), f"{method} recorded as applied with nothing converted"


def test_small_model_messages():
    model = tiny("llama", num_hidden_layers=2)
    refused(
        condify.ConfigError, "the default layer set selects no layer in a model with 2 layer\\(s\\)",
        condify.modify, model, "mod-threshold", model=model,
    )  # fmt: skip
    refused(
        condify.ConfigError, "`pairs=2` pairs \\(4 layers\\) do not fit in a model with 2 layers; `pairs` must be in 1..1",
        condify.modify, model, "layer-parallel", model=model,
    )  # fmt: skip


def test_consistent_layers_and_pairs_accepted():
    a, b = tiny("llama"), tiny("llama")
    condify.modify(a, "layer-parallel", layers=[2, 3], pairs=1, start=2)
    condify.modify(b, "layer-parallel", layers=[2, 3])
    assert condify.applied_configs(a) == condify.applied_configs(b)


CALIBRATE_OPTION_CASES = [
    ("mod-threshold", {"steps": "10"}, "`steps` must be int"),
    ("mod-threshold", {"steps": -1}, "`steps` must be an integer >= 0"),
    ("mod-threshold", {"lr": float("nan")}, "`lr` must be a finite number"),
    ("mod-threshold", {"lr": -1.0}, "`lr` must be a number >= 0.0"),
    ("mod-threshold", {"train": "everything"}, "`train` must be one of"),
    ("mod-threshold", {"capacity": 1.5}, "`capacity` must be a number > 0.0 and <= 1.0"),
    ("layer-parallel", {"finetune_steps": -1}, "`finetune_steps` must be an integer >= 0"),
    ("layer-parallel", {"pairs": True}, "`pairs` must be int \\| None"),
    ("dynamic-k", {"router_steps": "5"}, "`router_steps` must be int"),
    ("dynamic-k", {"target_sparsity": -0.1}, "`target_sparsity` must be a number >= 0.0"),
]


@pytest.mark.parametrize(("method", "options", "match"), CALIBRATE_OPTION_CASES)
def test_bad_calibrate_option(method, options, match):
    model = converted(method)
    refused(
        condify.ConfigError,
        match,
        condify.calibrate,
        model,
        good_data(),
        progress=False,
        model=model,
        **options,
    )


@pytest.mark.parametrize("method", CALIBRATED)
def test_unknown_calibrate_option(method):
    model = converted(method)
    refused(
        condify.ConfigError, "unknown options \\['bogus'\\]", condify.calibrate, model, good_data(), bogus=1,
        progress=False, model=model,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("holdout", "error", "match"),
    [
        (
            True,
            condify.ConfigError,
            "`holdout` must be a number of batches \\(int\\), batches, or None, got True",
        ),
        (1.5, condify.ConfigError, "`holdout` must be .* got 1.5"),
        (-1, condify.ConfigError, "`holdout=-1` must be in \\[0, 2\\]"),
        (3, condify.ConfigError, "`holdout=3` must be in \\[0, 2\\] for 3 batch"),
        ("last", condify.DataError, "calibrate: `holdout`: expected a tensor"),
    ],
)
def test_bad_holdout(holdout, error, match):
    model = converted("mod-threshold")
    refused(error, match, condify.calibrate, model, good_data(), holdout=holdout, progress=False, model=model)


# ----------------------------------------------------------------------------------------------------------
# calibration data
# ----------------------------------------------------------------------------------------------------------

M = torch.ones(2, 8, dtype=torch.long)
DATA_CASES = {
    "None": (None, "expected a tensor of input_ids or an iterable .* got NoneType"),
    "empty-list": ([], "calibration data is empty"),
    "empty-1d": (torch.empty(0, dtype=torch.long), "must have shape \\(batch, tokens\\) .* got \\(1, 0\\)"),
    "empty-2d": (torch.empty(2, 0, dtype=torch.long), "got \\(2, 0\\)"),
    "scalar": (torch.tensor(3), "got a scalar"),
    "string": ("some text", "got str"),
    "int": (3, "got int"),
    "dict-not-list": ({"input_ids": ids()}, "got dict"),
    "list-of-lists": ([[1, 2, 3]], "batch 0: expected a tensor of input_ids or a dict .* got list"),
    "dict-no-ids": ([{"ids": ids()}], "batch 0: .* got dict with keys \\['ids'\\]"),
    "ids-not-tensor": ([{"input_ids": [1, 2, 3]}], "`input_ids` must be a torch tensor, got list"),
    "float-ids": ([ids().float()], "input_ids must be integer token ids .* got torch.float32"),
    "bool-ids": ([ids() > 5], "got torch.bool"),
    "3d-item": ([ids().unsqueeze(0)], "must have shape \\(batch, tokens\\) .* got \\(1, 2, 8\\)"),
    "ids-ge-vocab": (
        [ids(), torch.full((2, 8), VOCAB)],
        "batch 1: token id 128 is out of range; .*\\[0, 128\\)",
    ),
    "negative-ids": ([torch.full((2, 8), -1)], "token id -1 is out of range"),
    "mask-shape": (
        [{"input_ids": ids(), "attention_mask": torch.ones(2, 5, dtype=torch.long)}],
        "attention_mask has shape \\(2, 5\\), input_ids \\(2, 8\\)",
    ),  # fmt: skip
    "mask-values": (
        [{"input_ids": ids(), "attention_mask": M * 2}],
        "must hold only 0 and 1, got values \\[2\\]",
    ),
    "mask-float": ([{"input_ids": ids(), "attention_mask": M.float()}], "integer or bool tensor of 0/1"),
    "mask-all-padding": ([{"input_ids": ids(), "attention_mask": M * 0}] * 3, "all zeros \\(only padding\\)"),
    "one-token": ([ids(2, 1)] * 3, "no next-token targets"),
    "mask-one-real-token": (
        [{"input_ids": ids(), "attention_mask": torch.eye(2, 8, dtype=torch.long)}] * 3,
        "no next-token targets",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(case):
    data, match = DATA_CASES[case]
    model = converted("mod-threshold")
    refused(condify.DataError, match, condify.calibrate, model, data, progress=False, model=model)


@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize(
    "case", ["empty-1d", "ids-ge-vocab", "negative-ids", "mask-shape", "mask-all-padding"]
)
def test_bad_data_every_method(method, case):
    """Damage (issue #18): these raised from deep inside transformers."""
    data, match = DATA_CASES[case]
    model = converted(method)
    refused(condify.DataError, match, condify.calibrate, model, data, progress=False, model=model)


@pytest.mark.parametrize("method", CALIBRATED)
def test_holdout_with_out_of_vocab_ids(method):
    """Damage (issue #18): the hold-out was only checked after training changed tensors."""
    model = converted(method)
    refused(
        condify.DataError, "calibrate: `holdout`: batch 0: token id 500 is out of range", condify.calibrate,
        model, good_data(), holdout=[torch.full((2, 8), 500)], progress=False, model=model,
    )  # fmt: skip


def test_holdout_all_padding():
    """Silent (issue #18): calibrate on all-padding masks returned ppl inf as a success."""
    model = converted("mod-threshold")
    data = [*good_data(2), {"input_ids": ids(), "attention_mask": torch.eye(2, 8, dtype=torch.long)}]
    refused(
        condify.DataError, "the 1 held-out batch\\(es\\) .* have no next-token target", condify.calibrate,
        model, data, holdout=1, progress=False, model=model,
    )  # fmt: skip


def test_as_batches_accepts_good_data():
    from condify.batches import as_batches

    out = as_batches([ids()[0], {"input_ids": ids(), "attention_mask": M.bool()}], vocab_size=VOCAB)
    assert out[0]["input_ids"].shape == (1, 8) and out[1]["attention_mask"].dtype == torch.long
    assert len(as_batches(torch.stack([ids(), ids()]))) == 2  # a (n, b, t) tensor is n batches


# ----------------------------------------------------------------------------------------------------------
# checkpoints: saving
# ----------------------------------------------------------------------------------------------------------


def test_save_to_none_refused(tmp_path, monkeypatch):
    """Silent (issue #18): save_pretrained(model, None) wrote ./None."""
    monkeypatch.chdir(tmp_path)
    model = converted("mod-threshold")
    refused(condify.CheckpointError, "expected a folder path .* got None", condify.save_pretrained, model, None,
            model=model, files=[tmp_path])  # fmt: skip
    assert not (tmp_path / "None").exists()


@pytest.mark.parametrize("path", ["", 3, b"dir"], ids=["empty", "int", "bytes"])
def test_save_to_bad_path_refused(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    model = converted("mod-threshold")
    refused(condify.CheckpointError, "expected a folder path", condify.save_pretrained, model, path,
            model=model, files=[tmp_path])  # fmt: skip


def test_save_onto_an_existing_file_refused(tmp_path):
    """Silent (issue #18): save_pretrained onto an existing file returned normally."""
    target = tmp_path / "weights.bin"
    target.write_bytes(b"precious")
    model = converted("mod-threshold")
    refused(condify.CheckpointError, "exists and is not a folder", condify.save_pretrained, model, target,
            model=model, files=[tmp_path])  # fmt: skip


def test_save_meta_model_refused(tmp_path):
    """Damage (issue #18): saving a meta-device model left config.json without weights."""
    with torch.device("meta"):
        model = tiny("llama")
    refused(condify.CheckpointError, "no weights to save .* meta device", condify.save_pretrained, model,
            tmp_path / "out", files=[tmp_path])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_save_not_a_model_refused(tmp_path):
    refused(condify.CheckpointError, "expected a transformers PreTrainedModel, got Linear",
            condify.save_pretrained, torch.nn.Linear(2, 2), tmp_path / "out", files=[tmp_path])  # fmt: skip


def test_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    model = converted("mod-threshold")
    condify.save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    before = files_of(tmp_path)
    real = type(model).save_pretrained

    def broken(self, path, **kw):
        real(self, path, **kw)  # writes everything, then fails
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        condify.save_pretrained(model, tmp_path / "ckpt")
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("method", METHODS)
def test_resave_unsharded_over_sharded(tmp_path, method):
    """Damage (issue #18): a stale index from an earlier sharded save broke from_pretrained."""
    model = converted(method).eval()
    x = ids()
    with torch.no_grad():
        out = model(x).logits
    before = state_of(model)
    condify.save_pretrained(model, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "tokenizer.json").write_text("{}")  # not a weight file: kept
    condify.save_pretrained(model, tmp_path)
    assert_unchanged(model, before)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    with torch.no_grad():
        assert torch.equal(condify.from_pretrained(tmp_path).eval()(x).logits, out)


def test_resave_sharded_over_unsharded(tmp_path):
    model = converted("dynamic-k").eval()
    x = ids()
    condify.save_pretrained(model, tmp_path)
    condify.save_pretrained(model, tmp_path, max_shard_size="40KB")
    assert not (tmp_path / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    with torch.no_grad():
        assert torch.equal(condify.from_pretrained(tmp_path).eval()(x).logits, model(x).logits)


# ----------------------------------------------------------------------------------------------------------
# checkpoints: loading
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny mod-threshold checkpoint (original folder; tests copy it before breaking it)."""
    path = tmp_path_factory.mktemp("saved")
    condify.save_pretrained(converted("mod-threshold"), path)
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(saved, out)
    return out


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


CONFIG_CASES = {
    "version-99": (lambda c: c["condify"].update(version=99), "format version 99 is not one this condify"),
    "version-str": (lambda c: c["condify"].update(version="1"), "format version '1' is not one"),
    "version-missing": (lambda c: c["condify"].pop("version"), "has no format `version`"),
    "condify-list": (lambda c: c.update(condify=[1]), "must be a dict with a list of `methods`"),
    "methods-none": (lambda c: c["condify"].update(methods=None), "must be a dict with a list of `methods`"),
    "method-key-missing": (
        lambda c: c["condify"]["methods"][0].pop("method"),
        "methods\\[0\\] must be a dict",
    ),
    "method-unknown": (lambda c: c["condify"]["methods"][0].update(method="nope"), "unknown method 'nope'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_checkpoint_config(saved, tmp_path, case):
    """Silent (issue #18): a checkpoint with top-level format version 99 loaded."""
    edit, match = CONFIG_CASES[case]
    path = _copy(saved, tmp_path)
    _edit_config(path, edit)
    err = refused(condify.CheckpointError, match, condify.from_pretrained, path, files=[path])
    assert "config.json" in str(err)


def test_bad_method_config_in_checkpoint(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_config(path, lambda c: c["condify"]["methods"][0].update(threshold="high"))
    refused(condify.ConfigError, "`threshold` must be float", condify.from_pretrained, path, files=[path])


@pytest.mark.parametrize("where", [None, "missing", "file", "no-config", "bad-json", "json-list"])
def test_bad_checkpoint_folder(saved, tmp_path, where):
    path = _copy(saved, tmp_path)
    match = {
        None: "expected a folder path",
        "missing": "does not exist",
        "file": "is not a folder",
        "no-config": "has no config.json",
        "bad-json": "config.json: not valid JSON",
        "json-list": "config.json: expected a JSON object, got list",
    }[where]
    target = path
    if where is None:
        target = None
    elif where == "missing":
        target = tmp_path / "nope"
    elif where == "file":
        target = path / "config.json"
    elif where == "no-config":
        (path / "config.json").unlink()
    elif where == "bad-json":
        (path / "config.json").write_text('{"condify": ')
    elif where == "json-list":
        (path / "config.json").write_text("[]")
    refused(condify.CheckpointError, match, condify.from_pretrained, target, files=[path])


def _rewrite_weights(path: Path, fn) -> None:
    w = load_file(str(path / "model.safetensors"))
    fn(w)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_original_tensor(saved, tmp_path):
    """Silent (issue #18): a checkpoint missing an original tensor loaded with random weights."""
    path = _copy(saved, tmp_path)
    _rewrite_weights(path, lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))
    refused(
        condify.CheckpointError, "1 tensor\\(s\\) of the original model are missing .*model.layers.0.mlp.up_proj",
        condify.from_pretrained, path, files=[path],
    )  # fmt: skip


def test_missing_original_tensor_dense_checkpoint(tmp_path):
    condify.save_pretrained(tiny("llama"), tmp_path)
    _rewrite_weights(tmp_path, lambda w: w.pop("model.norm.weight"))
    refused(condify.CheckpointError, "missing .*model.norm.weight", condify.from_pretrained, tmp_path,
            files=[tmp_path])  # fmt: skip


@pytest.mark.parametrize("dense", [False, True], ids=["condify", "dense"])
def test_original_tensor_of_another_shape(saved, tmp_path, dense):
    """Unclear before: transformers' "look at the above report" with the report silenced."""
    path = _copy(saved, tmp_path)
    if dense:
        _edit_config(path, lambda c: c.pop("condify"))
    _rewrite_weights(path, lambda w: w.update({"model.norm.weight": torch.ones(3)}))
    refused(condify.CheckpointError, "1 tensor\\(s\\) of the original model have another shape .*model.norm.weight",
            condify.from_pretrained, path, files=[path])  # fmt: skip


def test_unexpected_tensor(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _rewrite_weights(path, lambda w: w.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    refused(condify.CheckpointError, "unexpected: \\['model.layers.0.extra.weight'\\]", condify.from_pretrained,
            path, files=[path])  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_missing_condify_tensor(tmp_path, method):
    model = converted(method)
    condify.save_pretrained(model, tmp_path)
    added = sorted(
        f"{p}.{c}.{k}" for p, m in patched(model) for c in m._condify_patch.children
        for k in m.get_submodule(c).state_dict()
    )  # fmt: skip
    if not added:
        pytest.skip(f"{method} saves no tensors of its own")
    _rewrite_weights(tmp_path, lambda w: w.pop(added[0]))
    refused(condify.CheckpointError, f"does not match the saved weights \\(missing: \\['{added[0]}'",
            condify.from_pretrained, tmp_path, files=[tmp_path])  # fmt: skip


@pytest.mark.parametrize("damage", ["tiny", "garbage", "truncated-tail", "empty"])
def test_invalid_safetensors(saved, tmp_path, damage):
    """Unclear (issue #18): `SafetensorError: header too small` with no file named."""
    path = _copy(saved, tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {"tiny": b"abc", "garbage": b"\xff" * 64, "truncated-tail": data[:-100], "empty": b""}[damage]
    )
    err = refused(condify.CheckpointError, "model.safetensors", condify.from_pretrained, path, files=[path])
    assert str(path) in str(err)


def test_index_names_a_missing_shard(tmp_path):
    condify.save_pretrained(converted("mod-threshold"), tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    refused(condify.CheckpointError, f"weight file {shards[1].name} is missing", condify.from_pretrained,
            tmp_path, files=[tmp_path])  # fmt: skip


def test_invalid_index(tmp_path):
    condify.save_pretrained(converted("mod-threshold"), tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").write_text("{nope")
    refused(condify.CheckpointError, "model.safetensors.index.json: not a valid safetensors index",
            condify.from_pretrained, tmp_path, files=[tmp_path])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def cli_refused(argv, match, capsys, files=()):
    """``condify argv`` exits with status 2 and one line on stderr naming the problem, no traceback."""
    before = {str(f): files_of(f) for f in files}
    capsys.readouterr()  # drop what the set-up printed
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error message"
    import re

    assert re.search(match, lines[-1]), lines[-1]
    if "usage:" not in err:  # condify's own errors are one line (argparse prints usage first)
        assert len(lines) == 1 and lines[0].startswith("condify: error: "), err
    for f, snap in before.items():
        assert files_of(Path(f)) == snap, f"{f} changed"
    return lines[-1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_ckpt")
    condify.save_pretrained(converted("mod-threshold"), path)
    return path


CONVERT = ["convert", "--method", "layer-parallel", "--out"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["-o", "pairs"], "option 'pairs' must look like key=value"),
        (["-o", "=3"], "option '=3' must look like key=value"),
        (["-o", "pairs=1", "-o", "pairs=2"], "option 'pairs' is given twice"),
        (["-o", "pairs=0"], "`pairs` must be an integer >= 1, got 0"),
        (["-o", "pairs=true"], "`pairs` must be int \\(>= 1\\), got True \\(bool\\)"),
        (["-o", "fuse=no"], "`fuse` must be bool, got 'no'"),
        (["-o", "bogus=1"], "unknown options \\['bogus'\\]"),
        (["-o", "layers=[1,2]", "-o", "pairs=2"], "conflicts with pairs=2"),
    ],
)
def test_cli_convert_bad_options(tmp_path, capsys, extra, match):
    cli_refused([*CONVERT, str(tmp_path / "out"), *extra], match, capsys, files=[tmp_path])


def test_cli_unknown_method(tmp_path, capsys):
    cli_refused(
        ["convert", "--method", "nope", "--out", str(tmp_path / "o")], "unknown method 'nope'", capsys
    )


def test_cli_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cli_refused(
        [*CONVERT, str(tmp_path / "f")], "--out .* exists and is not a folder", capsys, files=[tmp_path]
    )


def test_cli_model_path_missing(tmp_path, capsys):
    cli_refused([*CONVERT, str(tmp_path / "o"), "--model", str(tmp_path / "no-model")], "cannot load model",
                capsys, files=[tmp_path])  # fmt: skip


@pytest.mark.parametrize("command", ["eval", "bench", "calibrate"])
def test_cli_checkpoint_missing(tmp_path, capsys, command):
    extra = ["--out", str(tmp_path / "o")] if command == "calibrate" else []
    cli_refused([command, str(tmp_path / "nope"), *extra], "does not exist", capsys, files=[tmp_path])


def test_cli_checkpoint_without_config(tmp_path, capsys):
    cli_refused(["eval", str(tmp_path)], "has no config.json", capsys, files=[tmp_path])


def test_cli_checkpoint_version_99(ckpt, tmp_path, capsys):
    path = _copy(ckpt, tmp_path)
    _edit_config(path, lambda c: c["condify"].update(version=99))
    cli_refused(["eval", str(path)], "format version 99", capsys, files=[path])


def test_cli_calibrate_dense_checkpoint(tmp_path, capsys):
    condify.save_pretrained(tiny("llama"), tmp_path / "dense")
    cli_refused(["calibrate", str(tmp_path / "dense"), "--out", str(tmp_path / "o")], "not a condify checkpoint",
                capsys, files=[tmp_path])  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--budget", "nonsense"],
            "'mod-threshold' has no budget 'nonsense'; choose from \\['cpu', 'long', 'quick'\\]",
        ),
        (["-c", "steps=-1"], "`steps` must be an integer >= 0, got -1"),
        (["-c", "bogus=1"], "unknown options \\['bogus'\\]"),
        (["-c", "lr=fast"], "`lr` must be float"),
        (["--batches", "0"], "--batches: expected a positive integer, got 0"),
    ],
)
def test_cli_calibrate_bad_options(ckpt, tmp_path, capsys, extra, match):
    """Silent (issue #18): `calibrate --budget nonsense` ran the defaults."""
    cli_refused(["calibrate", str(ckpt), "--out", str(tmp_path / "o"), *extra], match, capsys,
                files=[ckpt, tmp_path])  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--budget", "nonsense"], "has no budget 'nonsense'"),
        (["-c", "bogus=1"], "unknown options \\['bogus'\\]"),
        (["-o", "pairs=0"], "`pairs` must be an integer >= 1"),
        (["--eval-sequences", "0"], "--eval-sequences: expected a positive integer, got 0"),
        (["--eval-sequences", "many"], "expected a positive integer, got 'many'"),
    ],
)
def test_cli_run_bad_options(tmp_path, capsys, extra, match):
    cli_refused(["run", "--method", "layer-parallel", "--out", str(tmp_path / "o"), *extra], match, capsys,
                files=[tmp_path])  # fmt: skip


def test_cli_threads_must_be_positive(capsys):
    cli_refused(["--threads", "-2", "methods"], "--threads: expected a positive integer, got -2", capsys)


def test_cli_debug_shows_the_original_error(tmp_path):
    with pytest.raises(condify.ConfigError, match="`pairs` must be an integer >= 1"):
        cli.main(["--debug", *CONVERT, str(tmp_path / "o"), "-o", "pairs=0"])
    assert not (tmp_path / "o").exists()


def test_cli_error_exit_status_from_a_subprocess(tmp_path):
    import subprocess
    import sys

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(condify.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    r = subprocess.run(
        [sys.executable, "-m", "condify.cli", *CONVERT, str(tmp_path / "o"), "-o", "pairs=0"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "condify: error: layer-parallel: `pairs` must be an integer >= 1, got 0"
    ]


# ----------------------------------------------------------------------------------------------------------
# a failure half way through modify rolls back everything
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["second-target", "attach"])
def test_modify_failing_half_way_rolls_back(monkeypatch, method, where):
    import dataclasses

    spec = registry.get(method)
    calls = []

    def patch(model, adapter, cfg, target, from_checkpoint):
        calls.append(target.path)
        if where == "second-target" and len(calls) == 2:
            raise condify.ModifyError("injected failure")
        spec.patch(model, adapter, cfg, target, from_checkpoint)

    def attach(model, adapter, cfg, targets):
        if spec.attach is not None:
            spec.attach(model, adapter, cfg, targets)
        raise condify.ModifyError("injected failure")

    broken = dataclasses.replace(spec, patch=patch, attach=attach if where == "attach" else spec.attach)
    monkeypatch.setitem(registry._METHODS, method, broken)
    model = tiny("llama")
    opts = TINY_OPTIONS.get(method, {})
    if method == "layer-parallel":
        opts = {"pairs": 2, "start": 1}  # at least two targets
    x = ids()
    with torch.no_grad():
        dense = model(x).logits
    refused(condify.ModifyError, "injected failure", condify.modify, model, method, model=model, **opts)
    if where == "second-target":
        assert len(calls) == 2, "needs at least two targets"
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
