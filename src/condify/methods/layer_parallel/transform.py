"""Structural part of layer-parallel: check the pairs, then patch the layers."""

from __future__ import annotations

from torch import nn

from ...adapters import Adapter
from ...config import ConfigError
from ...convert import Target, patch
from .config import LayerParallelConfig
from .modules import PairState, pair_forward, passthrough_forward


def targets(model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig) -> list[Target]:
    layers = adapter.layer_list(model)
    idx = cfg.resolve(len(layers))
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or [None] * len(layers)
    for i in idx[::2]:
        if types[i] != types[i + 1]:
            raise ConfigError(
                f"layer-parallel: layers {i} and {i + 1} use different attention types ({types[i]}, {types[i + 1]}; "
                f"e.g. sliding vs full); choose a range whose pairs share one type"
            )
    return [Target(f"{adapter.layers}.{i}", layers[i], i) for i in idx]


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig, t: Target, from_checkpoint: bool
) -> None:
    first = (t.layer - cfg.resolve(len(adapter.layer_list(model)))[0]) % 2 == 0
    pair = (t.layer, t.layer + 1) if first else (t.layer - 1, t.layer)
    if first:
        st = PairState(
            t.layer, pair=pair, adapter=adapter, partner=adapter.layer_list(model)[t.layer + 1],
            fused=cfg.fuse and adapter.fusable,
        )  # fmt: skip
        patch(t.module, "layer-parallel", st, pair_forward)
    else:
        patch(t.module, "layer-parallel", PairState(t.layer, pair=pair), passthrough_forward)
