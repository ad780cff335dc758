"""Structural part of mod-threshold: check the gated layers, add a router to each, patch their forward.

A forward pre-hook on the module that owns the layer list captures the 2-D padding mask for the
gated layers (see :class:`~.modules.RouterState`); ``remove`` takes it off again.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from ...adapters import Adapter
from ...config import ConfigError
from ...convert import patch as patch_module
from ...convert import patched
from .config import ModThresholdConfig
from .modules import RouterState, gated_forward

_SUPPORTED_ATTENTION = ("eager", "sdpa")


def _owner(model: nn.Module, adapter: Adapter) -> nn.Module:
    parent = adapter.layers.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def plan(model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig) -> list[str]:
    layers = adapter.layer_list(model)
    idx = cfg.resolve(len(layers))
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in _SUPPORTED_ATTENTION:
        raise ConfigError(
            f"mod-threshold: attention implementation {impl!r} is not supported (gated layers pass "
            f"ragged masks); load the model with attn_implementation in {_SUPPORTED_ATTENTION}"
        )
    for i in idx:
        if getattr(layers[i].get_submodule(adapter.attn), "layer_idx", None) is None:
            raise ConfigError(f"mod-threshold: layer {i}'s attention has no `layer_idx`; cannot cache it")
    return [f"{adapter.layers}.{i}" for i in idx]


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


def apply(model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig, from_checkpoint: bool) -> None:
    layers = adapter.layer_list(model)
    windows = _windows(model, len(layers))
    state = RouterState()
    hidden = model.config.get_text_config(decoder=True).hidden_size
    for i in cfg.resolve(len(layers)):
        layer = layers[i]
        ref = next(layer.parameters())
        router = nn.Linear(hidden, 1).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            router.weight.zero_()
            router.bias.fill_(cfg.init_bias)
        patch_module(
            layer,
            "mod-threshold",
            gated_forward,
            children={"router": router},
            index=i,
            config=cfg,
            adapter=adapter,
            state=state,
            sliding_window=windows[i],
        )
    _owner(model, adapter).register_forward_pre_hook(state.capture, with_kwargs=True)
    cfg.layers = cfg.resolve(len(layers))  # saved explicitly, whatever the default of this version


def remove(model: nn.Module, adapter: Adapter, cfg: ModThresholdConfig) -> None:
    states = {id(m._condify_patch.info["state"]) for _, m in patched(model, "mod-threshold")}
    owner = _owner(model, adapter)
    for key, hook in list(owner._forward_pre_hooks.items()):
        if getattr(hook, "__func__", None) is RouterState.capture and id(hook.__self__) in states:
            del owner._forward_pre_hooks[key]
            owner._forward_pre_hooks_with_kwargs.pop(key, None)
