"""Structural part of mot: check, slice the MLPs into experts (in place), add the controller.

On a model without weights (meta device) ``modify`` builds the structure only, as for a checkpoint (no
clustering, no centroid controller init); load a converted model's tensors before use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import Adapter
from ...config import ConfigError
from ...convert import update_config
from ...patching import Target, patch
from ..dynamic_k.clustering import balanced_kmeans, permutation
from ..dynamic_k.modules import require_activation
from ..dynamic_k.transform import (
    block_layout_,
    check_permutable,
    divisors,
    gate_features,
    no_values,
    permute_,
    relayout_,
)
from .config import MoTConfig
from .modules import METHOD, Controller, MoTLayout, MoTSite, converted, mot_forward


def activation(model: nn.Module) -> str:
    return require_activation(model.config, METHOD)


def targets(model: nn.Module, adapter: Adapter, cfg: MoTConfig) -> list[Target]:
    activation(model)
    layers = adapter.layer_list(model)
    out = []
    for i in cfg.layers or []:
        mlp = layers[i].get_submodule(adapter.mlp)
        check_permutable(mlp, adapter, METHOD, f"{adapter.layers}.{i}.{adapter.mlp}")
        inter = adapter.mlp_weights(mlp)["up"].shape[0]
        if inter % cfg.num_experts:
            raise ConfigError(
                f"mot: num_experts={cfg.num_experts} does not divide the MLP intermediate size {inter} "
                f"(layer {i}); values that divide it: {divisors(inter)}"
            )
        out.append(Target(f"{adapter.layers}.{i}.{adapter.mlp}", mlp, i, kind="mlp"))
    return out


def _linears(mlp: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, bool]]:
    names = [(adapter.gate, False), (adapter.up, False), (adapter.gate_up, False), (adapter.down, True)]
    return [(mlp.get_submodule(n), down) for n, down in names if n is not None]


@torch.no_grad()
def centroid_router(mlp: nn.Module, adapter: Adapter, experts: int, scale: float) -> torch.Tensor:
    """(E, d) controller init: each expert's mean gate (up for non-GLU) row, unit norm, times ``scale``.

    ``x . W_c[e]`` is then the mean pre-activation of expert e's neurons: a token scores high for the
    experts whose gates it opens, which is what the MoT mixing and the later top-k routing should favour.
    """
    w = adapter.mlp_weights(mlp)
    rows = w["gate"] if w["gate"] is not None else w["up"]
    c = rows.reshape(experts, -1, rows.shape[1]).mean(1)
    return F.normalize(c.float(), dim=-1).to(rows.dtype) * scale


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: MoTConfig, t: Target, from_checkpoint: bool
) -> None:
    mlp, i = t.module, t.layer
    up = adapter.mlp_weights(mlp)["up"]
    from_checkpoint = from_checkpoint or no_values(up)
    inter, d = up.shape
    E = cfg.num_experts
    router = Controller(d, E, cfg.temperature).to(device=up.device, dtype=up.dtype)
    router.temperature = router.temperature.float()
    layout = MoTLayout(torch.arange(inter)).to(up.device)
    st = MoTSite(
        i, adapter=adapter, group_size=cfg.group_size, experts=E, expert_size=inter // E,
        top_k=cfg.k, activation=activation(model), stage=cfg.stage,
    )  # fmt: skip
    patch(mlp, METHOD, st, mot_forward, children={"router": router, "expert_layout": layout})
    block_layout_(_linears(mlp, adapter), adapter.conv1d)
    if from_checkpoint:
        return
    if cfg.clustering == "gate" and 1 < E < inter:
        labels = balanced_kmeans(gate_features(mlp, adapter), E, seed=i)
        relayout_(mlp, adapter, permutation(labels))
    if cfg.router_init == "centroid":
        router.weight.data.copy_(centroid_router(mlp, adapter, E, cfg.router_scale))


def set_stage(model: nn.Module, cfg: MoTConfig, new: str) -> MoTConfig:
    """Switch every converted MLP to stage ``new`` and record it in the saved config."""
    cfg = cfg.replace(stage=new)
    for _, m in converted(model):
        m._condify_patch.state.stage = new
    update_config(model, cfg)
    return cfg


def remove(model: nn.Module, adapter: Adapter, cfg: MoTConfig) -> None:
    """Restore the original neuron order and weight layout exactly (before the children are removed);
    every MLP is checked before any is changed (:func:`check_permutable`)."""
    sites = converted(model)
    for path, mlp in sites:
        check_permutable(mlp, adapter, "unmodify", path)
    for _, mlp in sites:
        if "expert_layout" in mlp._modules:
            permute_(mlp, adapter, torch.argsort(mlp.expert_layout.perm))
        block_layout_(_linears(mlp, adapter), adapter.conv1d, restore=True)
