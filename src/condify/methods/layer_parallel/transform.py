"""Structural part of layer-parallel: check the pairs, then patch the layers."""

from __future__ import annotations

from torch import nn

from ...adapters import Adapter
from ...config import ConfigError
from ...convert import patch
from .config import LayerParallelConfig
from .modules import pair_forward, passthrough_forward


def plan(model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig) -> list[str]:
    layers = adapter.layer_list(model)
    idx = cfg.resolve(len(layers))
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or [None] * len(layers)
    for i in idx[::2]:
        if types[i] != types[i + 1]:
            raise ConfigError(
                f"layer-parallel: layers {i} and {i + 1} use different attention types ({types[i]}, {types[i + 1]}; "
                f"e.g. sliding vs full); choose a range whose pairs share one type"
            )
    cfg.start = idx[0]  # record the resolved placement in the saved config
    return [f"{adapter.layers}.{i}" for i in idx]


def apply(model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig, from_checkpoint: bool) -> None:
    layers = adapter.layer_list(model)
    idx = cfg.resolve(len(layers))
    fused = cfg.fuse and adapter.fusable
    for i in idx[::2]:
        patch(
            layers[i],
            "layer-parallel",
            pair_forward,
            pair=(i, i + 1),
            fused=fused,
            adapter=adapter,
            partner=layers[i + 1],
        )
        patch(layers[i + 1], "layer-parallel", passthrough_forward, pair=(i, i + 1))
