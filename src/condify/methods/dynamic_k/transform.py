"""Structural part of dynamic-k: check, patch the MLPs (and projections), cluster and permute in place.

On a model without weights (meta device, e.g. ``accelerate.init_empty_weights()``) ``modify`` builds the
structure only, as it does for a checkpoint: no clustering and no initialisation from the weights (there
are no values); load a converted model's tensors (a condify checkpoint, ``load_state_dict``) before use.
"""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import Adapter
from ...config import ConfigError
from ...convert import ModifyError
from ...patching import Target, patch
from .clustering import balanced_kmeans, permutation
from .config import DynamicKConfig
from .modules import (
    _PLAIN_TENSORS,
    _PLAIN_TYPES,
    METHOD,
    ExpertLayout,
    ExpertSite,
    Router,
    converted,
    mlp_modules,
    model_activation,
    moe_forward,
)
from .projection import PROJECTION, ProjectionMLP


def no_values(t: torch.Tensor) -> bool:
    """True if ``t`` has no data to initialise from (meta device)."""
    return t.device.type == "meta"


def check_plain_linear(m: nn.Module, where: str, method: str, why: str) -> None:
    """Raise :class:`ModifyError` unless ``m`` is exactly an ``nn.Linear`` / transformers ``Conv1D`` with
    a plain weight (hooks are fine): a PEFT layer, a quantised or parametrized Linear holds weights of its
    own that condify's in-place changes would not follow."""
    if type(m) in _PLAIN_TYPES and type(m.__dict__["_parameters"].get("weight")) in _PLAIN_TENSORS:
        return
    raise ModifyError(
        f"{method}: {where} is a {type(m).__module__}.{type(m).__name__}, not a plain nn.Linear / Conv1D; "
        f"{why}, which the wrapper's own weights (PEFT adapters, quantised storage) would not follow, so "
        f"nothing was changed. Convert first, then wrap (condify.modify, then get_peft_model); to calibrate "
        f"or unmodify a wrapped model, merge the adapters into the weights first (merge_and_unload())"
    )


def check_permutable(mlp: nn.Module, adapter: Adapter | object, method: str, where: str = "the MLP") -> None:
    """:func:`check_plain_linear` for every projection of ``mlp`` (what :func:`permute_` rewrites)."""
    for name, m in mlp_modules(adapter, mlp).items():
        if m is not None:
            why = f"{method} permutes the MLP's neurons in place (modify, calibrate and unmodify do)"
            check_plain_linear(m, f"{where}'s {name} projection", method, why)


def _indices(model: nn.Module, adapter: Adapter, cfg: DynamicKConfig) -> list[int]:
    n = len(adapter.layer_list(model))
    return list(range(n)) if cfg.layers is None else list(cfg.layers)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def activation_name(model: nn.Module, cfg: DynamicKConfig) -> str:
    act = cfg.activation or model_activation(model.config)
    if act is None:
        raise ConfigError(
            "dynamic-k: the model's MLP activation is not one of silu/gelu/gelu_tanh/relu; "
            "pass activation='relu' to compute the experts with ReLU"
        )
    return act


def projections(adapter: Adapter) -> list[str]:
    """Names of the attention projections (relative to the attention module)."""
    return [n for n in (adapter.q, adapter.k, adapter.v, adapter.qkv, adapter.o) if n is not None]


def projection_shape(proj: nn.Module, adapter: Adapter) -> tuple[int, int]:
    """(d_in, d_out) of a projection (nn.Linear, or GPT-2 Conv1D)."""
    w = getattr(proj, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ConfigError(
            f"dynamic-k: attention=True needs linear projections, got {type(proj).__name__}; "
            "use attention=False"
        )
    d_out, d_in = w.t().shape if adapter.conv1d else w.shape
    return d_in, d_out


def targets(model: nn.Module, adapter: Adapter, cfg: DynamicKConfig) -> list[Target]:
    activation_name(model, cfg)
    layers = adapter.layer_list(model)
    out = []
    for i in _indices(model, adapter, cfg):
        if cfg.attention:
            attn = layers[i].get_submodule(adapter.attn)
            for name in projections(adapter):
                proj = attn.get_submodule(name)
                where = f"{adapter.layers}.{i}.{adapter.attn}.{name}"
                check_plain_linear(proj, where, METHOD, "dynamic-k converts it in place (attention=True)")
                projection_shape(proj, adapter)
                out.append(Target(f"{adapter.layers}.{i}.{adapter.attn}.{name}", proj, i, kind=name))
        mlp = layers[i].get_submodule(adapter.mlp)
        check_permutable(mlp, adapter, METHOD, f"{adapter.layers}.{i}.{adapter.mlp}")
        inter = adapter.mlp_weights(mlp)["up"].shape[0]
        if inter % cfg.expert_size:
            raise ConfigError(
                f"dynamic-k: expert_size={cfg.expert_size} does not divide the MLP intermediate size {inter} "
                f"(layer {i}); sizes that divide it: {divisors(inter)}"
            )
        out.append(Target(f"{adapter.layers}.{i}.{adapter.mlp}", mlp, i, kind="mlp"))
    return out


@torch.no_grad()
def permute_(mlp: nn.Module, adapter: Adapter, p: torch.Tensor) -> None:
    """Reorder the MLP's neurons in place: new neuron j is old neuron ``p[j]`` (function unchanged).
    Refused (:func:`check_permutable`, before anything changes) when a projection is wrapped."""
    check_permutable(mlp, adapter, "condify")
    w = adapter.mlp_weights(mlp)
    p = p.to(w["up"].device)
    for k in ("gate", "up", "b_gate", "b_up"):
        if w[k] is not None:
            w[k].copy_(w[k][p])
    w["down"].copy_(w["down"][:, p])


def relayout_(mlp: nn.Module, adapter: Adapter, p: torch.Tensor) -> None:
    """Apply a further permutation ``p`` and record it in ``expert_layout.perm``."""
    permute_(mlp, adapter, p)
    layout = mlp.expert_layout
    layout.perm.copy_(layout.perm[p.to(layout.perm.device)])


def _restride_(w: torch.Tensor, column_major: bool) -> None:
    """Store parameter ``w`` (2-D) contiguous or column-major (``w.t()`` contiguous), in place: same
    values, shape, name and object; only the strides change."""
    if (w.t() if column_major else w).is_contiguous():
        return
    w.data = w.data.t().contiguous().t() if column_major else w.data.contiguous()


def block_layout_(linears: list[tuple[nn.Module, bool]], conv1d: bool, restore: bool = False) -> None:
    """Store weights so that every expert's block is one contiguous piece of memory.

    ``linears``: (module, is_down) pairs. In nn.Linear layout the gate/up rows of an expert are
    contiguous already, but its ``w_down`` (d, I) block is a column slice, read as d short strided
    pieces; the down weight is therefore kept column-major (storage (I, d), each neuron's column
    contiguous). GPT-2 Conv1D stores the transposes, so there the up weight is the one restrided.
    ``restore`` makes every weight contiguous again (the layout transformers creates).
    """
    for lin, is_down in linears:
        _restride_(lin.weight, column_major=not restore and is_down != conv1d)


def _mlp_linears(mlp: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, bool]]:
    names = [(adapter.gate, False), (adapter.up, False), (adapter.gate_up, False), (adapter.down, True)]
    return [(mlp.get_submodule(n), down) for n, down in names if n is not None]


def gate_features(mlp: nn.Module, adapter: Adapter) -> torch.Tensor:
    """Rows clustered by ``clustering="gate"``: gate rows (GLU) or up rows, plus biases when present."""
    w = adapter.mlp_weights(mlp)
    rows, b = (w["gate"], w["b_gate"]) if w["gate"] is not None else (w["up"], w["b_up"])
    return rows if b is None else torch.cat([rows, b[:, None]], dim=1)


def _patch_projection(
    proj: nn.Module, name: str, i: int, adapter: Adapter, cfg: DynamicKConfig, from_checkpoint: bool
) -> None:
    d_in, d_out = projection_shape(proj, adapter)
    h, s = cfg.projection_width(d_in, d_out)
    w = proj.weight
    bias = getattr(proj, "bias", None)
    mlp = ProjectionMLP(d_in, h, d_out, bias=bias is not None).to(device=w.device, dtype=w.dtype)
    from_checkpoint = from_checkpoint or no_values(w)
    if not from_checkpoint:
        mlp.init_from_linear(w.t() if adapter.conv1d else w, bias)
    block_layout_([(mlp.up, False), (mlp.down, True)], conv1d=False)
    children = {
        "expert_mlp": mlp,
        "router": Router(d_in, cfg.router_width, h // s).to(device=w.device, dtype=w.dtype),
        "expert_layout": ExpertLayout(torch.arange(h), cfg.tau).to(w.device),
    }
    st = ExpertSite(i, adapter=PROJECTION, expert_size=s, experts=h // s, activation="relu", site=name)
    patch(proj, METHOD, st, moe_forward, children=children)
    if not from_checkpoint and cfg.clustering == "gate" and 1 < h // s < h:
        labels = balanced_kmeans(gate_features(proj, PROJECTION), h // s, seed=i)
        relayout_(proj, PROJECTION, permutation(labels))


def patch_target(
    model: nn.Module, adapter: Adapter, cfg: DynamicKConfig, t: Target, from_checkpoint: bool
) -> None:
    if t.kind != "mlp":
        _patch_projection(t.module, t.kind, t.layer, adapter, cfg, from_checkpoint)
        return
    mlp, i = t.module, t.layer
    up = adapter.mlp_weights(mlp)["up"]
    from_checkpoint = from_checkpoint or no_values(up)
    inter, d = up.shape
    experts = inter // cfg.expert_size
    router = Router(d, cfg.router_width, experts).to(device=up.device, dtype=up.dtype)
    layout = ExpertLayout(torch.arange(inter), cfg.tau).to(up.device)
    st = ExpertSite(
        i, adapter=adapter, expert_size=cfg.expert_size, experts=experts,
        activation=activation_name(model, cfg), site="mlp",
    )  # fmt: skip
    patch(mlp, METHOD, st, moe_forward, children={"router": router, "expert_layout": layout})
    block_layout_(_mlp_linears(mlp, adapter), adapter.conv1d)
    if not from_checkpoint and cfg.clustering == "gate" and 1 < experts < inter:
        labels = balanced_kmeans(gate_features(mlp, adapter), experts, seed=i)
        relayout_(mlp, adapter, permutation(labels))


def remove(model: nn.Module, adapter: Adapter, cfg: DynamicKConfig) -> None:
    """Restore the original neuron order exactly (before the children are removed); projections keep
    their original weights throughout, so dropping their children restores them. Every MLP is checked
    before any is changed (:func:`check_permutable`)."""
    sites = converted(model, "mlp")
    for path, mlp in sites:
        check_permutable(mlp, adapter, "unmodify", path)
    for _, mlp in sites:
        if "expert_layout" in mlp._modules:  # a half-patched module (a failed modify) has none yet
            permute_(mlp, adapter, torch.argsort(mlp.expert_layout.perm))
        block_layout_(_mlp_linears(mlp, adapter), adapter.conv1d, restore=True)
