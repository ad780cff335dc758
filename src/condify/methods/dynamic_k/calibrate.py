"""Data-dependent step of dynamic-k, in five stages (each optional, in this order):

0. **Distil projections** (only with ``attention=True``; ``attention_steps > 0``): each attention
   projection's ``expert_mlp`` regresses the original linear map's output (MSE, Adam) on that
   projection's inputs in the original model (up to ``attention_tokens`` tokens).
1. **Sparsify** (``sparsify=True``): compute the MLPs with ReLU (``activation="relu"``, the default
   when sparsifying; ``None`` keeps the model's activation) and fine-tune the model weights (the MLPs,
   or everything with ``sparsify_params="all"``) on ``loss + penalty_weight * sum_layers penalty(a)``
   where ``a`` are the MLP hidden activations and ``penalty`` the per-token square Hoyer
   ``||a||_1^2/||a||_2^2`` (or ``"l1"``). The loss is KL to the original dense model (``distill``,
   so the held-out ratio measures what the step costs, not domain adaptation) or the LM loss.
2. **Cluster** (``cluster``; default: when co-activation clustering is configured or the weights were
   just sparsified, since gate-row clusters from ``modify`` are still valid otherwise): balanced k-means of the neurons (``cfg.clustering``: gate rows, or
   co-activation profiles |a| over ``coactivation_tokens`` calibration tokens), permuted in place.
3. **Routers** (``router_steps > 0``): the model frozen, each router regresses its experts' true output
   L2 norms (MSE, Adam) on up to ``router_tokens`` dense-model MLP inputs.
4. **Thresholds** (``target_sparsity``, or the config's; :mod:`.thresholds`): per layer, so that a fraction
   ``1 - target_sparsity`` of expert compute runs on the calibration tokens, spread by ``allocation``:
   the same fraction in every layer (``"uniform"``, the default), by measured cost (``"sensitivity"``:
   each MLP alone at a few fractions, KL to dense on ``sensitivity_tokens`` calibration tokens, then
   :func:`condify.allocation.allocate`; after the routed fine-tune within 2 % of uniform either way on
   SmolLM2 and Gemma-3, at twice the time: ``benchmarks/results/calibration_choices.md``) or one global
   ``tau``.
   Selection by router scores, or by true norms with ``oracle=True`` (then the
   reported ``ppl`` and ``executed`` are for oracle selection too; evaluate that way later with
   ``mode(model, "oracle")``).
   Then (``reorder=True``, router selection only) the experts of each site are renumbered so that
   co-selected experts are neighbours (:func:`order_experts_`; same function, fewer runs of selected
   experts per token for the CPU decode path).
5. **Adapt** (``adapt_steps``; default whenever there is a target: :func:`condify.training.recovery_steps`,
   1-4 passes over the fit batches sized to the data, ending at the pass that scored best on the hold-out):
   fine-tune the model weights (everything but the
   routers with ``adapt_params="all"``, or only the converted sites with ``"mlp"``) under its own routing
   (mode ``"masked"``: exactly the sparse function, differentiable), KL to the dense model. Routers and
   thresholds stay fixed, so the model learns to work with the selection it will run with. This is the
   step that recovers quality on a non-ReLU model (``benchmarks/results/dynamic_k_adapt.md``). It runs
   at ``adapt_lr`` and at ``adapt_lr_choice`` x ``adapt_lr`` (None: only the first), each from the same
   start, and keeps the one that scored better on the hold-out: no one rate suits every model and data
   size (frontier settings, 75 % / 50 % targets, 3e-4 vs 1e-4: SmolLM2 x1.058 / x1.219 vs x1.284 at
   50 %, Gemma-3-270M x1.147 / x1.487 vs x1.102 / x1.380; calibrate's hold-out picked the better rate in
   each; ``benchmarks/results/rates_and_passes.md``). The kept attempt must not raise the held-out NLL
   beyond noise, else the stage is retried at a tenth of ``adapt_lr``, else undone
   (``Run.keep_if_better``). ``adapt_lr`` is quoted for weights of RMS 0.2: with ``adapt_lr_scale=
   "weights"`` (default) each of the model's own matrices trains at ``adapt_lr`` x its RMS / 0.2 and the
   stage warms up over a quarter of its steps; unscaled (``"none"``, one warm-up step) the rate took
   Gemma-3-270M (matrices of RMS 0.02-0.04) x1.66 -> x3.21 at a 50 % target, scaled x1.66 -> x1.46
   (``benchmarks/results/finetune_rates.md``).

The teacher of stages 1 and 5 (``distill=True``) is the model as ``calibrate`` received it, unmodified:
the original dense model on a first call.

The held-out batches of ``condify.calibrate`` (never trained on) give the reported perplexities,
activation sparsity and executed fraction. Budgets: see the ``recipes`` in ``__init__`` ("cpu": a few
minutes on 2 cores; "long": GPU-sized).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...batches import first_tokens, real_tokens
from ...config import ConfigError, Options, option
from ...convert import applied_configs, update_config
from ...run import RATE_CHOICE, Run, lr_factors
from ...tracking import track
from ...training import LR_SCALES, Batch, fit_regression, mean_nll, recovery_steps
from .clustering import balanced_kmeans, permutation
from .config import DynamicKConfig
from .finetune import PARAMS, adapt_, sparsify_
from .losses import PENALTIES
from .modules import METHOD, Sites, converted, expert_norms, mode
from .thresholds import ALLOCATIONS, fit_tau, order_experts_
from .transform import gate_features, relayout_

MIN_TOKENS = 256  # calibration tokens (outside the hold-out) below which calibrate refuses to run


def _ppl(model: nn.Module, batches: list[Batch]) -> float:
    return math.exp(mean_nll(model, batches))


@torch.no_grad()
def collect(
    model: nn.Module, batches: list[Batch], max_tokens: int, what: str, sites: Sites | None = None
) -> dict[str, list[torch.Tensor]]:
    """Run the model with every site (or ``sites``) dense and keep, per such site, up to ``max_tokens``
    rows of ``what``: ``"inputs"`` -> true expert norms; ``"hidden"`` -> hidden activations."""
    sites = converted(model) if sites is None else sites
    out: dict[str, list[torch.Tensor]] = {p: [] for p, _ in sites}
    seen = 0
    with mode(model, "dense", sites):
        for b in batches:
            if seen >= max_tokens:
                break
            recs = {p: [] for p in out}
            for p, m in sites:
                m._condify_patch.state.record = recs[p]
            try:
                model(**b, use_cache=False)
            finally:
                for _, m in sites:
                    m._condify_patch.state.record = None
            keep = b["attention_mask"].reshape(-1).bool() if "attention_mask" in b else None
            for p, m in sites:
                h = recs[p][0]
                if keep is not None:
                    h = h[keep]
                h = h[: max_tokens - seen]
                if what == "hidden":
                    out[p].append(h)
                else:
                    st = m._condify_patch.state
                    out[p].append(expert_norms(h, st.adapter.mlp_weights(m)["down"], st.expert_size))
            seen += h.shape[0]
    return out


@contextlib.contextmanager
def _recording_inputs(sites: list[tuple[str, nn.Module]]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the (flattened) first positional input of every site while the context is open."""
    xs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in sites}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, p=p: xs[p].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for p, m in sites
    ]
    try:
        yield xs
    finally:
        for h in hooks:
            h.remove()


def _real(x: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
    """Drop the rows of padding tokens from inputs recorded over the first batches of ``batches``."""
    if not batches or "attention_mask" not in batches[0]:
        return x
    mask = torch.cat([b["attention_mask"].reshape(-1).bool() for b in batches])
    return x[mask[: x.shape[0]]]


@torch.no_grad()
def _collect_inputs(
    model: nn.Module, batches: list[Batch], max_tokens: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per converted site: (inputs x (T, d), true expert norms (T, E)) of the dense model."""
    with _recording_inputs(converted(model)) as xs:
        norms = collect(model, batches, max_tokens, "inputs")
    out = {}
    for p in xs:
        n = torch.cat(norms[p])
        out[p] = (_real(torch.cat(xs[p]), batches)[: n.shape[0]], n)
    return out


def distill_projections(
    model: nn.Module,
    batches: list[Batch],
    steps: int,
    lr: float = 1e-3,
    max_tokens: int = 8192,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, float]:
    """Stage 0: fit every projection's ``expert_mlp`` to the original linear map (MSE, Adam).

    Inputs are the projection's inputs in the original model. The last 10 % of tokens score the fit;
    returns the mean relative error ``||mlp(x) - linear(x)||^2 / ||linear(x)||^2`` before and after.
    """
    sites = converted(model, "attention")
    seen, used = 0, []
    with torch.no_grad(), mode(model, "original"), _recording_inputs(sites) as xs:
        for b in batches:
            if seen >= max_tokens:
                break
            model(**b, use_cache=False)
            used.append(b)
            seen += real_tokens([b])
    before, after = [], []
    for p, m in tqdm(sites, desc="distil projections", disable=not progress, leave=False):
        x = _real(torch.cat(xs.pop(p)), used)[:max_tokens].detach()
        with torch.no_grad(), mode(model, "original"):
            y = m(x)
        n_val = max(1, x.shape[0] // 10)
        xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
        mlp = m.expert_mlp
        scale = float((yt**2).mean().clamp(min=1e-12))

        def rel(
            xx: torch.Tensor, yy: torch.Tensor, mlp: nn.Module = mlp, scale: float = scale
        ) -> torch.Tensor:
            return ((mlp.down(torch.relu(mlp.up(xx))) - yy) ** 2).mean() / scale

        with torch.no_grad():
            before.append(float(rel(xv, yv)))
        fit_regression(
            list(mlp.parameters()), lambda r, xt=xt, yt=yt, rel=rel: rel(xt[r], yt[r]), xt.shape[0],
            steps=steps, lr=lr, batch_size=batch_size,
        )  # fmt: skip
        with torch.no_grad():
            after.append(float(rel(xv, yv)))
    k = max(1, len(after))
    return {"attention_rel_error_before": sum(before) / k, "attention_rel_error_after": sum(after) / k}


def train_routers(
    model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, float]:
    """Fit the router of every site in ``data`` to its expert norms (MSE); the last 10 % of tokens score it.

    Returns the mean held-out MSE before and after, and the mean R^2 (1 - MSE / variance of targets).
    """
    before, after, r2 = [], [], []
    sites = [(p, m) for p, m in converted(model) if p in data]
    for p, m in tqdm(sites, desc="routers", disable=not progress, leave=False):
        x, y = data[p][0].detach(), data[p][1].detach()
        n_val = max(1, x.shape[0] // 10)
        xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
        router = m.router
        with torch.no_grad():
            before.append(float(((router(xv) - yv) ** 2).mean()))
            # train in units of this layer's mean norm (Adam steps are scale-free), starting at the mean
            scale = float(yt.mean().clamp(min=1e-12))
            router.fc2.weight.mul_(0.1 / scale)
            router.fc2.bias.copy_(yt.mean(0) / scale)
        fit_regression(
            list(router.parameters()),
            lambda r, router=router, xt=xt, yt=yt, scale=scale: ((router(xt[r]) - yt[r] / scale) ** 2).mean(),
            xt.shape[0], steps=steps, lr=lr, batch_size=batch_size,
        )  # fmt: skip
        with torch.no_grad():
            router.fc2.weight.mul_(scale)  # abs(scale * z) = scale * abs(z): back to norm units
            router.fc2.bias.mul_(scale)
            mse = float(((router(xv) - yv) ** 2).mean())
        after.append(mse)
        r2.append(1 - mse / max(float(((yv - yt.mean(0)) ** 2).mean()), 1e-12))
    k = max(1, len(after))
    return {
        "router_mse_before": sum(before) / k,
        "router_mse_after": sum(after) / k,
        "router_r2": sum(r2) / k,
    }


@torch.no_grad()
def measure(model: nn.Module, batches: list[Batch], oracle: bool = False) -> dict[str, float]:
    """Perplexity and executed fraction of expert compute on ``batches`` (sparse or oracle selection):
    ``executed`` for the FFNs, ``executed_attention`` for the projections (when converted)."""
    with mode(model, "oracle" if oracle else "sparse"), track(model) as t:
        ppl = _ppl(model, batches)
    res = {"ppl": ppl, "executed": t.fraction(METHOD, "mlp")}
    if converted(model, "attention"):
        res["executed_attention"] = t.fraction(METHOD, "attention")
    return res


@torch.no_grad()
def activation_sparsity(model: nn.Module, batches: list[Batch], eps: float = 1e-3) -> float:
    """Fraction of FFN hidden activations with ``|a| <= eps`` (exact zeros under ReLU)."""
    acts = collect(model, batches, 1 << 30, "hidden", converted(model, "mlp"))
    zero = sum(int((h.abs() <= eps).sum()) for hs in acts.values() for h in hs)
    total = sum(h.numel() for hs in acts.values() for h in hs)
    return zero / max(total, 1)


def cluster_(model: nn.Module, cfg: DynamicKConfig, batches: list[Batch], coactivation_tokens: int) -> None:
    """Stage 2: balanced k-means and in-place permutation of every converted MLP."""
    acts = collect(model, batches, coactivation_tokens, "hidden") if cfg.clustering == "coactivation" else {}
    for p, m in converted(model):
        st = m._condify_patch.state
        E = st.experts
        if not 1 < E < E * st.expert_size:
            continue
        feats = torch.cat(acts[p]).abs().t() if acts else gate_features(m, st.adapter)
        relayout_(m, st.adapter, permutation(balanced_kmeans(feats, E, seed=st.layer)))


@dataclasses.dataclass
class DynamicKCalibration(Options):
    """Options of dynamic-k's ``calibrate``, by stage (see the module docstring)."""

    owner = "dynamic-k calibrate"

    attention_steps: int = option(1000, ge=0)
    attention_lr: float = option(1e-3, ge=0.0)
    attention_tokens: int = option(8192, ge=1)
    sparsify: bool = False
    activation: str | None = option("relu", choices=(None, "relu"))
    penalty: str = option("hoyer", choices=tuple(PENALTIES))
    penalty_weight: float = option(1e-4, ge=0.0)
    sparsify_steps: int = option(100, ge=0)
    sparsify_lr: float = option(1e-4, ge=0.0)
    sparsify_params: str = option("mlp", choices=PARAMS)
    distill: bool = True
    cluster: bool | None = None
    coactivation_tokens: int = option(2048, ge=1)
    router_steps: int = option(500, ge=0)
    router_lr: float = option(1e-3, ge=0.0)
    router_tokens: int = option(8192, ge=1)
    target_sparsity: float | None = option(None, ge=0.0, lt=1.0)
    allocation: str = option("uniform", choices=ALLOCATIONS)
    sensitivity_tokens: int = option(512, ge=1)
    reorder: bool = True
    adapt_steps: int | None = option(None, ge=0)
    adapt_lr: float = option(3e-4, ge=0.0)
    adapt_lr_choice: float | None = option(RATE_CHOICE, gt=0.0)
    adapt_params: str = option("all", choices=PARAMS)
    adapt_lr_scale: str = option("weights", choices=LR_SCALES)
    oracle: bool = False


def calibrate(model: nn.Module, run: Run, opts: DynamicKCalibration) -> dict[str, Any]:
    """Run the stages described in the module docstring; returns their measurements (held-out batches).

    Keys: ``attention_rel_error_before/after`` and ``ppl_after_attention_distill`` (stage 0, tau = 0),
    ``activation_sparsity_before/after`` (FFNs) and ``ppl_after_sparsify`` (tau = 0, i.e. the cost of
    stage 1), ``router_mse_before/after``, ``router_r2``, ``tau`` (per layer), ``ppl_before_adapt`` and
    ``adapt_loss`` (first, last) of stage 5; ``condify.calibrate`` adds ``ppl`` and ``executed``.
    """
    cfg = next(c for c in applied_configs(model) if c.method == METHOD)
    fit, held, o = run.fit, run.held, opts
    if real_tokens(fit) < MIN_TOKENS:
        raise ConfigError(
            f"dynamic-k calibrate: only {real_tokens(fit)} calibration tokens outside the hold-out; "
            f"need at least {MIN_TOKENS} (e.g. 4 sequences of 256 tokens)"
        )
    target = cfg.target_sparsity if o.target_sparsity is None else o.target_sparsity
    adapt_steps = (
        (recovery_steps(fit) if target is not None else 0) if o.adapt_steps is None else o.adapt_steps
    )
    if adapt_steps and target is None:
        raise ConfigError(
            "dynamic-k calibrate: `adapt_steps` fine-tunes the model under its routing at a target; "
            "pass `target_sparsity` (or set it in the config)"
        )
    res: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    if held:
        with mode(model, "original"):
            res["activation_sparsity_before"] = activation_sparsity(model, held)
    if o.attention_steps and converted(model, "attention"):
        res.update(
            distill_projections(
                model, fit, o.attention_steps, o.attention_lr, o.attention_tokens, progress=run.progress
            )
        )
        if held:
            with mode(model, "dense"):
                res["ppl_after_attention_distill"] = _ppl(model, held)
    teacher = run.teacher() if o.distill and ((o.sparsify and o.sparsify_steps) or adapt_steps) else None
    if o.sparsify:
        losses = sparsify_(
            model, cfg, run, teacher, activation=o.activation, penalty=o.penalty,
            penalty_weight=o.penalty_weight, steps=o.sparsify_steps, lr=o.sparsify_lr, params=o.sparsify_params,
        )  # fmt: skip
        cfg = next(c for c in applied_configs(model) if c.method == METHOD)
        model.eval()
        res["sparsify_loss"] = (losses[0], losses[-1]) if losses else None
        if held:
            with mode(model, "dense"):
                res["ppl_after_sparsify"] = _ppl(model, held)
                res["activation_sparsity_after"] = activation_sparsity(model, held)
    if o.cluster or (o.cluster is None and (o.sparsify or cfg.clustering == "coactivation")):
        cluster_(model, cfg, fit, o.coactivation_tokens)
    data = None
    if o.router_steps:
        data = _collect_inputs(model, fit, o.router_tokens)
        res.update(train_routers(model, data, o.router_steps, o.router_lr, progress=run.progress))
    if target is not None:
        data = data or _collect_inputs(model, fit, o.router_tokens)
        res["tau"] = fit_tau(
            model, data, target, allocation=o.allocation, oracle=o.oracle,
            batches=first_tokens(fit, o.sensitivity_tokens), progress=run.progress,
        )  # fmt: skip
        if o.reorder and not o.oracle:
            res.update(order_experts_(model, data))
        update_config(model, cfg.replace(target_sparsity=target))
    if adapt_steps:
        if held:
            res["ppl_before_adapt"] = measure(model, held)["ppl"]
        losses, kept = run.keep_if_better(
            lambda lr: adapt_(
                model, run, teacher, steps=adapt_steps, lr=lr, params=o.adapt_params,
                lr_scale=o.adapt_lr_scale,
            ),
            o.adapt_lr, "dynamic-k adapt",
            factors=lr_factors(o.adapt_lr_choice),
        )  # fmt: skip
        model.eval()
        res["adapt_loss"] = (losses[0], losses[-1]) if losses else None
        res["adapt_steps"], res["adapt_lr"], res["adapt_tried"] = adapt_steps, kept["lr"], kept["tried"]
        res["adapt_passes"] = run.passes.get("adapt")  # held-out NLL per pass, the pass kept
    if o.oracle:
        run.eval_mode = lambda: mode(model, "oracle")
    model.train(was_training)
    return res
