"""Structural part of layer-parallel: list the paired layers, then patch each."""

from __future__ import annotations

from torch import nn

from ...adapters import Adapter
from ...convert import Target, patch
from .config import LayerParallelConfig
from .modules import PairState, pair_forward, second_forward


def _types(model: nn.Module, n: int) -> list[str | None]:
    return getattr(model.config.get_text_config(decoder=True), "layer_types", None) or [None] * n


def targets(model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig) -> list[Target]:
    layers = adapter.layer_list(model)
    return [Target(f"{adapter.layers}.{i}", layers[i], i) for i in cfg.resolve(len(layers))]


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig, t: Target, from_checkpoint: bool
) -> None:
    layers = adapter.layer_list(model)
    idx = cfg.resolve(len(layers))
    first = idx.index(t.layer) % 2 == 0
    a, b = (t.layer, t.layer + 1) if first else (t.layer - 1, t.layer)
    types = _types(model, len(layers))
    mixed = types[a] != types[b]  # e.g. sliding + full attention: each layer keeps its own mask
    st = PairState(
        t.layer, pair=(a, b), adapter=adapter, partner=layers[b if first else a],
        fused=first and not mixed and cfg.fuse and adapter.fusable, mixed=mixed,
    )  # fmt: skip
    patch(t.module, "layer-parallel", st, pair_forward if first else second_forward)
