"""Structural part of lte: check, patch the MLPs, cluster and permute in place (dynamic-k's machinery).

On a model without weights (meta device) ``modify`` builds the structure only, as for a checkpoint (no
clustering); load a converted model's tensors before use.
"""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import Adapter
from ...config import ConfigError
from ...patching import Target, patch
from ..dynamic_k.clustering import balanced_kmeans, permutation
from ..dynamic_k.modules import ExpertLayout, require_activation
from ..dynamic_k.transform import (
    _mlp_linears,
    block_layout_,
    check_permutable,
    divisors,
    gate_features,
    no_values,
    permute_,
    relayout_,
)
from .config import LteConfig
from .modules import METHOD, LteSite, SigmoidRouter, converted, lte_forward


def _indices(model: nn.Module, adapter: Adapter, cfg: LteConfig) -> list[int]:
    n = len(adapter.layer_list(model))
    return list(range(n)) if cfg.layers is None else list(cfg.layers)


def activation(model: nn.Module) -> str:
    return require_activation(model.config, METHOD)


def targets(model: nn.Module, adapter: Adapter, cfg: LteConfig) -> list[Target]:
    activation(model)
    layers = adapter.layer_list(model)
    out = []
    for i in _indices(model, adapter, cfg):
        mlp = layers[i].get_submodule(adapter.mlp)
        check_permutable(mlp, adapter, METHOD, f"{adapter.layers}.{i}.{adapter.mlp}")
        inter = adapter.mlp_weights(mlp)["up"].shape[0]
        if inter % cfg.expert_size:
            raise ConfigError(
                f"lte: expert_size={cfg.expert_size} does not divide the MLP intermediate size {inter} "
                f"(layer {i}); sizes that divide it: {divisors(inter)}"
            )
        out.append(Target(f"{adapter.layers}.{i}.{adapter.mlp}", mlp, i, kind="mlp"))
    return out


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: LteConfig, t: Target, from_checkpoint: bool
) -> None:
    mlp, i = t.module, t.layer
    up = adapter.mlp_weights(mlp)["up"]
    from_checkpoint = from_checkpoint or no_values(up)
    inter, d = up.shape
    experts = inter // cfg.expert_size
    router = SigmoidRouter(d, experts).to(device=up.device, dtype=up.dtype)
    with torch.no_grad():  # "keep everything": every score is sigmoid(init_bias) > threshold
        router.weight.zero_()
        router.bias.fill_(cfg.init_bias)
    init_score = float(torch.sigmoid(torch.tensor(cfg.init_bias, dtype=up.dtype)))
    layout = ExpertLayout(torch.arange(inter), cfg.threshold).to(up.device)
    st = LteSite(
        i, adapter=adapter, expert_size=cfg.expert_size, experts=experts, activation=activation(model),
        init_score=init_score,
    )  # fmt: skip
    patch(mlp, METHOD, st, lte_forward, children={"router": router, "expert_layout": layout})
    block_layout_(_mlp_linears(mlp, adapter), adapter.conv1d)
    if not from_checkpoint and 1 < experts < inter:
        labels = balanced_kmeans(gate_features(mlp, adapter), experts, seed=i)
        relayout_(mlp, adapter, permutation(labels))


def remove(model: nn.Module, adapter: Adapter, cfg: LteConfig) -> None:
    """Restore the original neuron order and weight layout exactly (before the children are removed);
    every MLP is checked before any is changed (:func:`check_permutable`)."""
    sites = converted(model)
    for path, mlp in sites:
        check_permutable(mlp, adapter, "unmodify", path)
    for _, mlp in sites:
        if "expert_layout" in mlp._modules:  # a half-patched module (a failed modify) has none yet
            permute_(mlp, adapter, torch.argsort(mlp.expert_layout.perm))
        block_layout_(_mlp_linears(mlp, adapter), adapter.conv1d, restore=True)
