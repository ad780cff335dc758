"""Structural part of layer-parallel: list the paired layers, then patch each."""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import Adapter
from ...patching import Target, patch, patched
from .config import LayerParallelConfig
from .modules import PairState, layout, pair_forward, parts, remove, second_forward


def _types(model: nn.Module, n: int) -> list[str | None]:
    return getattr(model.config.get_text_config(decoder=True), "layer_types", None) or [None] * n


def _shape(lin: nn.Module) -> tuple[int, int] | None:
    w = getattr(lin, "weight", None)
    return tuple(w.shape) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def targets(model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig) -> list[Target]:
    layers = adapter.layer_list(model)
    return [
        Target(f"{adapter.layers}.{i}", layers[i], i, peft_safe=True) for i in cfg.resolve(len(layers))
    ]  # generic path calls wrapped modules


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig, t: Target, from_checkpoint: bool
) -> None:
    layers = adapter.layer_list(model)
    idx = cfg.resolve(len(layers))
    first = idx.index(t.layer) % 2 == 0
    a, b = (t.layer, t.layer + 1) if first else (t.layer - 1, t.layer)
    types = _types(model, len(layers))
    mixed = types[a] != types[b]  # e.g. sliding + full attention: each layer keeps its own mask
    fused = not mixed and cfg.fuse and adapter.fusable  # the pair's, shown on both layers
    classes = groups = None
    if fused and first:  # the fused path runs these classes' computation; other classes take the generic path
        ps = [parts(adapter, layers[i]) for i in (a, b)]
        classes = (type(ps[0].attn), type(ps[0].mlp))
        groups = layout([{n: _shape(lin) for n, lin in p.proj.items()} for p in ps])
    st = PairState(
        t.layer, pair=(a, b), adapter=adapter, partner=layers[b if first else a],
        fused=fused, mixed=mixed, classes=classes, groups=groups,
    )  # fmt: skip
    patch(t.module, "layer-parallel", st, pair_forward if first else second_forward)


def remove_pairs(model: nn.Module, adapter: Adapter, cfg: LayerParallelConfig) -> None:
    """Give the parameters of every fused pair their own storage again (``unmodify``, rollback)."""
    for _, module in patched(model, "layer-parallel"):
        st: PairState = module._condify_patch.state
        if st.fused and st.layer == st.pair[0]:
            remove(st, (module, st.partner))
