"""Structural part of mod-threshold: check the gated layers, add a router to each, patch their forward.

A forward pre-hook on the module that owns the layer list captures the 2-D padding mask for the
gated layers (see :class:`~.modules.RouterState`) and refuses a KV cache the gated layers cannot fill
(e.g. ``StaticCache``) before any layer runs; ``remove`` takes it off again.

PEFT: the gated layers call their (possibly wrapped) submodules and no weight is changed, so
``modify`` after ``get_peft_model`` is exact (the router is a new, trainable ``nn.Linear``; a PEFT
``save_pretrained`` does not save it: merge and save with ``condify.save_pretrained``). On the meta
device (``accelerate.init_empty_weights()``) ``modify`` builds the routers on meta too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from ...adapters import Adapter
from ...config import ConfigError
from ...patching import Target, patched
from ...patching import patch as patch_module
from .config import ModThresholdConfig
from .modules import GatedState, RouterState, gated_forward

_SUPPORTED_ATTENTION = ("eager", "sdpa")


def _owner(model: nn.Module, adapter: Adapter) -> nn.Module:
    parent = adapter.layers.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def targets(model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig) -> list[Target]:
    layers = adapter.layer_list(model)
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in _SUPPORTED_ATTENTION:
        raise ConfigError(
            f"mod-threshold: attention implementation {impl!r} is not supported (gated layers pass "
            f"ragged masks); load the model with attn_implementation in {_SUPPORTED_ATTENTION}"
        )
    out = []
    for i in cfg.resolve(len(layers)):
        if getattr(layers[i].get_submodule(adapter.attn), "layer_idx", None) is None:
            raise ConfigError(f"mod-threshold: layer {i}'s attention has no `layer_idx`; cannot cache it")
        out.append(Target(f"{adapter.layers}.{i}", layers[i], i, peft_safe=True))  # calls submodules
    return out


def _windows(model: nn.Module, n: int) -> list[int | None]:
    try:
        types, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except Exception:  # configs without per-layer information: full attention
        return [None] * n
    out = [
        kw.get("sliding_window") if t != "full_attention" else None
        for t, kw in zip(types, kwargs, strict=False)
    ]
    return out + [None] * (n - len(out))


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig, t: Target, from_checkpoint: bool
) -> None:
    gated = patched(model, "mod-threshold")
    shared = gated[0][1]._condify_patch.state.shared if gated else RouterState()
    hidden = model.config.get_text_config(decoder=True).hidden_size
    ref = next(t.module.parameters())
    router = nn.Linear(hidden, 1).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.fill_(cfg.init_bias)
    window = _windows(model, len(adapter.layer_list(model)))[t.layer]
    st = GatedState(t.layer, config=cfg, adapter=adapter, shared=shared, sliding_window=window)
    patch_module(t.module, "mod-threshold", st, gated_forward, children={"router": router})


def attach(model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig, targets: list[Target]) -> None:
    shared: RouterState = targets[0].module._condify_patch.state.shared
    shared.handle = _owner(model, adapter).register_forward_pre_hook(shared.capture, with_kwargs=True)


def remove(model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig) -> None:
    for _, m in patched(model, "mod-threshold")[:1]:
        shared: RouterState = m._condify_patch.state.shared
        if shared.handle is not None:
            shared.handle.remove()
            shared.handle = None
