"""Training-free routing tools of mod-threshold: router init, bias fitting, keep-rates and layer choice.

:func:`init_routers` starts each router from a ridge regression of its layer's relative update, and
:func:`fit_biases` moves each router bias so its hard keep-rate equals a capacity; :func:`at_capacity`
is the model fitted so for the duration of a block. :func:`layer_sensitivity` measures what gating one
layer alone costs, and :func:`choose_layers` re-gates the least sensitive ones (calibrate's ``auto_layers``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...adapters import get_adapter
from ...config import ConfigError
from ...convert import applied_configs, modify, unmodify, update_config
from ...patching import patched
from ...run import Run
from ...tracking import track
from ...training import Batch, kl_loss
from .config import ModThresholdConfig
from .modules import RouterState

log = logging.getLogger("condify")


def gated_layers(model: nn.Module) -> dict[int, nn.Module]:
    layers = {m._condify_patch.state.layer: m for _, m in patched(model, "mod-threshold")}
    if not layers:
        raise ConfigError("mod-threshold: the model has no gated layers; call condify.modify first")
    return dict(sorted(layers.items()))


def router_state(model: nn.Module) -> RouterState:
    return next(iter(gated_layers(model).values()))._condify_patch.state.shared


def forward_routes(model: nn.Module, b: Batch) -> None:
    """A forward for the routing decisions only (logits of the last position, when supported)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        model(**b, use_cache=False, logits_to_keep=1)
    else:
        model(**b, use_cache=False)


@torch.no_grad()
def keep_rates(model: nn.Module, batches: list[Batch] | Any) -> dict[int, float]:
    """Measured fraction of (non-padding) tokens that take each gated layer, by layer index."""
    from ...batches import as_batches

    batches = as_batches(batches, next(model.parameters()).device)
    gated_layers(model)
    was_training = model.training
    model.eval()
    try:
        with track(model) as t:
            for b in batches:
                forward_routes(model, b)
    finally:
        model.train(was_training)
    return t.per_layer("mod-threshold")


def concat(batches: list[Batch]) -> Batch:
    """One right-padded batch holding every sequence of ``batches``."""
    t = max(b["input_ids"].shape[1] for b in batches)
    ids, masks = [], []
    for b in batches:
        x = b["input_ids"]
        m = b.get("attention_mask", torch.ones_like(x))
        ids.append(torch.nn.functional.pad(x, (0, t - x.shape[1])))
        masks.append(torch.nn.functional.pad(m, (0, t - x.shape[1])))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


@torch.no_grad()
def fit_biases(model: nn.Module, batches: list[Batch] | Any, capacity: float) -> dict[int, float]:
    """Shift each router bias so its hard keep-rate on ``batches`` (any calibration data) is ``capacity``;
    returns the shifts by layer index.

    One forward over all of ``batches`` at once; each gated layer fits its bias on its own inputs
    before deciding, so later layers are fitted on the inputs they will really see. After training in
    your own loop, where the bias controller lags the capacity while the layers change, this sets the
    keep-rate the model runs at.
    """
    from ...batches import as_batches

    if not 0.0 < capacity <= 1.0:
        raise ConfigError(f"fit_biases: `capacity` must be in (0, 1], got {capacity!r}")
    batches = as_batches(batches, next(model.parameters()).device)
    gated, state = gated_layers(model), router_state(model)
    before = {i: float(layer.router.bias) for i, layer in gated.items()}
    was_training, state.fit = model.training, capacity
    model.eval()
    try:
        forward_routes(model, concat(batches))
    finally:
        state.fit = None
        model.train(was_training)
    return {i: float(layer.router.bias) - before[i] for i, layer in gated.items()}


@torch.no_grad()
def init_routers(model: nn.Module, batches: list[Batch], scale: float = 2.0, ridge: float = 1e-2) -> None:
    """Training-free router init: predict each token's relative update ``log(|f(h)| / |h|)`` from ``h``.

    A ridge regression per gated layer on a dense forward; the router logit is the prediction,
    scaled to standard deviation ``scale`` (tokens the layer changes most are kept first). The
    bias is then set by :func:`fit_biases`.
    """
    gated, state = gated_layers(model), router_state(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i: int):
        def f(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x, out)

        return f

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in gated.items()]
    big = concat(batches)
    was_training, state.keep_all = model.training, True
    model.eval()
    try:
        forward_routes(model, big)
    finally:
        state.keep_all = False
        model.train(was_training)
        for h in handles:
            h.remove()
    real = big["attention_mask"].bool()
    for i, layer in gated.items():
        x, out = seen[i]
        x, out = x[real].double(), out[real].double()
        y = torch.log((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6) + 1e-6)
        xm, ym = x.mean(0), y.mean()
        xc, yc = x - xm, y - ym
        gram = xc.T @ xc
        lam = ridge * gram.diagonal().mean()
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
        pred = xc @ w
        w = w * (scale / pred.std().clamp_min(1e-12))
        layer.router.weight.copy_(w[None].to(layer.router.weight.dtype))
        layer.router.bias.fill_(float(-(xm @ w)))


@contextlib.contextmanager
def at_capacity(model: nn.Module, batches: list[Batch], capacity: float) -> Iterator[None]:
    """The model with its router biases fitted to ``capacity`` on ``batches`` (:func:`fit_biases`); the
    biases are put back on exit. calibrate scores every held-out measurement in it (each pass, the
    rates tried, the report), so what it selects on is the model it returns: while the layers train,
    the keep-rate controller lags the target (Gemma-3-270M + python-docs at capacity 0.5, 2 passes: the
    trained model kept 61-89 % of the test tokens per layer at the controller's biases, and was scored
    there; ``benchmarks/results/mod_threshold_lag.md``)."""
    gated = gated_layers(model)
    biases = {i: layer.router.bias.detach().clone() for i, layer in gated.items()}
    fit_biases(model, batches, capacity)
    try:
        yield
    finally:
        with torch.no_grad():
            for i, layer in gated.items():
                layer.router.bias.copy_(biases[i])


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    batches: list[Batch] | Any,
    *,
    capacity: float = 0.5,
    candidates: list[int] | None = None,
    holdout: list[Batch] | Any | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[int, float]:
    """Mean per-token KL(model || gated) in nats when one layer alone is gated at ``capacity``, per candidate.

    Training-free: each candidate is converted alone (``modify(..., layers=[i], **options)``), its router
    initialised and its bias fitted on ``batches`` (:func:`init_routers`, :func:`fit_biases`), compared
    with the model as it came on ``holdout`` (default: ``batches``), then converted back (``unmodify``:
    the model is left as it came). ``candidates`` default to every layer but the first and the last.
    Cost: the data once, then three forwards of it per candidate (two of them for the last position only).
    """
    from ...batches import as_batches

    if any(c.method == "mod-threshold" for c in applied_configs(model)):
        raise ConfigError(
            "layer_sensitivity: the model already has mod-threshold; pass the model before modify"
        )
    device = next(model.parameters()).device
    batches = as_batches(batches, device)
    holdout = batches if holdout is None else as_batches(holdout, device)
    n = len(get_adapter(model).layer_list(model))
    candidates = list(range(1, n - 1)) if candidates is None else list(candidates)
    was_training = model.training
    model.eval()
    out: dict[int, float] = {}
    try:
        refs = [model(**b, use_cache=False).logits for b in holdout]  # the model as it came, once
        for i in tqdm(candidates, desc="mod-threshold: layer sensitivity", disable=not progress, leave=False):
            modify(model, "mod-threshold", **{**options, "layers": [i], "capacity": capacity})
            try:
                init_routers(model, batches)
                fit_biases(model, batches, capacity)
                kl = [
                    float(kl_loss(model(**b, use_cache=False).logits, r, b))
                    for b, r in zip(holdout, refs, strict=True)
                ]
                out[i] = sum(kl) / len(kl)
            finally:
                unmodify(model, "mod-threshold")
    finally:
        model.train(was_training)
    return out


def choose_layers(
    model: nn.Module, run: Run, cfg: ModThresholdConfig, capacity: float, batches: int
) -> dict[int, float] | None:
    """Re-gate the model's ``len(cfg.layers)`` least sensitive layers (:func:`layer_sensitivity` at
    ``capacity`` on the first ``batches`` fit batches, every layer but the first and the last) and record
    them (``auto_layers`` off). Returns the chosen layers' sensitivities (nats/token); None, with the set
    kept and recorded as fixed, when a router was already trained (its layer choice is the user's)."""
    if any(layer.router.weight.any() for layer in gated_layers(model).values()):
        log.info("mod-threshold calibrate: routers already trained; the gated layers %s are kept", cfg.layers)
        update_config(model, cfg.replace(auto_layers=False))
        for layer in gated_layers(model).values():
            layer._condify_patch.state.config.auto_layers = False
        return None
    unmodify(model, "mod-threshold")
    options = {k: getattr(cfg, k) for k in ("threshold", "mode", "init_bias", "sink_tokens", "debug_checks")}
    sens = layer_sensitivity(model, run.fit[:batches], capacity=capacity, progress=run.progress, **options)
    keep = sorted(sens, key=sens.__getitem__)[: len(cfg.layers or [])]
    modify(model, cfg.replace(layers=sorted(keep), auto_layers=False))
    return {i: round(sens[i], 4) for i in sorted(keep)}


def least_sensitive_layers(
    model: nn.Module, batches: list[Batch] | Any, num: int, **kwargs: Any
) -> list[int]:
    """The ``num`` layers whose gating costs least by :func:`layer_sensitivity` (same arguments), sorted."""
    sens = layer_sensitivity(model, batches, **kwargs)
    if not 1 <= num <= len(sens):
        raise ConfigError(f"least_sensitive_layers: `num` must be in [1, {len(sens)}], got {num}")
    return sorted(sorted(sens, key=sens.__getitem__)[:num])
