"""Data-dependent step of mod-threshold: router training plus continued training of the model.

One loop trains the routers (straight-through gate, see :mod:`.modules`) together with the model
weights chosen by ``train`` (default: all decoder layers; embeddings, final norm and LM head stay
frozen). The loss is KL to the dense model's logits (``distill=True``, the dense model is a frozen
copy taken before training) or next-token cross entropy, plus ``lm_weight`` × cross entropy.

The keep-rate is not a loss term: every step, each router's bias is moved so that the batch's
hard keep-rate of that layer matches the scheduled capacity (the ``(1 - c)`` quantile of the router
logits is put at the threshold, smoothed with ``bias_momentum``). This holds every layer exactly at
its target without fighting the LM gradient, which shapes the router *weights* (which tokens to
keep). The capacity walks linearly from 1.0 down to the target over the first ``ramp`` fraction of
the steps. After training, biases are fitted once more layer by layer on the calibration data
(:func:`fit_biases`), so the hard keep-rate of every gated layer equals the target on that data.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...adapters import Adapter, get_adapter
from ...config import ConfigError, in_range
from ...convert import applied_configs, modify, patched, unmodify
from ...training import Batch, kl_loss, lm_loss, mean_nll
from .config import ModThresholdConfig
from .modules import RouterState, quantile_shift

_TRAIN = ("all", "gated", "routers")


def _gated(model: nn.Module) -> dict[int, nn.Module]:
    layers = {m._condify_patch.info["index"]: m for _, m in patched(model, "mod-threshold")}
    if not layers:
        raise ConfigError("mod-threshold: the model has no gated layers; call condify.modify first")
    return dict(sorted(layers.items()))


def _state(model: nn.Module) -> RouterState:
    return next(iter(_gated(model).values()))._condify_patch.info["state"]


def _forward_routes(model: nn.Module, b: Batch) -> None:
    """A forward for the routing decisions only (logits of the last position, when supported)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        model(**b, use_cache=False, logits_to_keep=1)
    else:
        model(**b, use_cache=False)


@torch.no_grad()
def keep_rates(model: nn.Module, batches: list[Batch] | Any) -> dict[int, float]:
    """Measured fraction of (non-padding) tokens that take each gated layer, by layer index."""
    from ...training import as_batches

    batches = as_batches(batches, next(model.parameters()).device)
    state = _state(model)
    kept: dict[int, float] = {}
    total: dict[int, float] = {}
    was_training, state.record = model.training, {}
    model.eval()
    try:
        for b in batches:
            _forward_routes(model, b)
            for i, (_, keep, real, _) in state.record.items():
                n = keep.numel() if real is None else real.sum()
                kept[i] = kept.get(i, 0.0) + float(keep.sum())
                total[i] = total.get(i, 0.0) + float(n)
    finally:
        state.record = None
        model.train(was_training)
    return {i: kept[i] / max(total[i], 1.0) for i in sorted(kept)}


def _concat(batches: list[Batch]) -> Batch:
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
def fit_biases(model: nn.Module, batches: list[Batch], capacity: float) -> dict[int, float]:
    """Shift each router bias so its hard keep-rate on ``batches`` is ``capacity``.

    One forward over all of ``batches`` at once; each gated layer fits its bias on its own inputs
    before deciding, so later layers are fitted on the inputs they will really see.
    """
    gated, state = _gated(model), _state(model)
    before = {i: float(layer.router.bias) for i, layer in gated.items()}
    was_training, state.fit = model.training, capacity
    model.eval()
    try:
        _forward_routes(model, _concat(batches))
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
    gated, state = _gated(model), _state(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i: int):
        def f(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x, out)

        return f

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in gated.items()]
    big = _concat(batches)
    was_training, state.keep_all = model.training, True
    model.eval()
    try:
        _forward_routes(model, big)
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


def _cosine(n: int, warm: int):
    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, n - warm)))

    return f


def _params(
    model: nn.Module, adapter: Adapter, gated: dict[int, nn.Module], train: str
) -> list[nn.Parameter]:
    if train == "routers":
        return []
    layers = adapter.layer_list(model)
    chosen = gated.values() if train == "gated" else layers
    return [p for layer in chosen for n, p in layer.named_parameters() if not n.startswith("router.")]


def calibrate(
    model: nn.Module,
    adapter: Adapter,
    cfg: ModThresholdConfig,
    batches: list[Batch],
    *,
    capacity: float | None = None,
    steps: int = 100,
    router_steps: int = 0,
    train: str = "all",
    lr: float = 3e-4,
    router_lr: float = 1e-5,
    distill: bool = True,
    lm_weight: float = 0.0,
    ramp: float = 0.5,
    bias_momentum: float = 0.5,
    init: bool = True,
    fit_batches: int = 8,
    holdout: list[Batch] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train routers (and the model, per ``train``) to keep a fraction ``capacity`` of tokens per layer.

    ``capacity`` defaults to ``cfg.capacity`` (and is recorded there). ``router_steps`` first train
    the routers alone (model frozen), then ``steps`` train routers and model together; the capacity
    ramp runs over both. ``train``: ``"all"`` decoder layers, ``"gated"`` layers only, or
    ``"routers"`` only. ``init`` gives routers that are still at their init (weight 0) the
    training-free start of :func:`init_routers`. The first ``fit_batches`` batches fit the biases
    (:func:`fit_biases`) before and after training. ``holdout`` batches (optional) are used for the
    reported keep-rates and perplexity. The dense teacher is the model as it comes in, routing off.
    Learning rates, measured on SmolLM2 at capacity 0.75 (120 steps of 2 x 128 tokens): ``router_lr``
    1e-3 made the KL loss *rise* after the capacity ramp (Adam moves every router weight by ~lr per
    step, and the residual stream has a few huge coordinates, so the routing decisions drift away
    from the training-free init faster than the layers can follow): x1.81 held-out perplexity; 1e-5
    kept the init's decisions and let the layers adapt: x1.17. ``lr`` (decoder layers) 3e-4 beat 5e-5
    (x2.06 vs x3.04 after 40 steps, router_lr 1e-3). Returns per-layer keep-rates, losses, bias shifts
    and the number of tokens used.
    """
    from ...convert import update_config

    capacity = cfg.capacity if capacity is None else capacity
    in_range("capacity", capacity, 0.0, 1.0, lo_open=True)
    in_range("ramp", ramp, 0.0, 1.0)
    in_range("bias_momentum", bias_momentum, 0.0, 1.0, hi_open=True)
    if train not in _TRAIN:
        raise ConfigError(f"mod-threshold calibrate: `train` must be one of {_TRAIN}, got {train!r}")
    if steps < 0 or router_steps < 0:
        raise ConfigError("mod-threshold calibrate: `steps` and `router_steps` must be >= 0")
    gated = _gated(model)
    state = _state(model)
    if holdout is not None:
        from ...training import as_batches

        holdout = as_batches(holdout, next(model.parameters()).device)
    routers = [p for layer in gated.values() for p in layer.router.parameters()]
    total = router_steps + steps
    fit_on = batches[: max(1, fit_batches)]
    ramp_steps = max(1, round(ramp * total))
    if init and all(not layer.router.weight.any() for layer in gated.values()):
        init_routers(model, fit_on)
        fit_biases(model, fit_on, 1.0 - (1.0 - capacity) / ramp_steps if total else capacity)
    teacher = None
    if distill and total:
        teacher = unmodify(copy.deepcopy(model)).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def forward(b: Batch) -> tuple[torch.Tensor, dict[int, Any]]:
        state.record = {}
        try:
            logits = model(**b, use_cache=False).logits
            return logits, state.record
        finally:
            state.record = None

    def loss_of(logits: torch.Tensor, b: Batch) -> torch.Tensor:
        if teacher is None:
            return lm_loss(logits, b)
        with torch.no_grad():
            t = teacher(**b, use_cache=False).logits
        loss = kl_loss(logits, t, b)
        return loss + lm_weight * lm_loss(logits, b) if lm_weight else loss

    result: dict[str, Any] = {"capacity": capacity, "train": train, "distill": distill, "losses": []}
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    step = 0
    try:
        for phase, n, params in (
            ("routers", router_steps, []),
            (train, steps, _params(model, adapter, gated, train)),
        ):
            if n == 0:
                continue
            for p in model.parameters():
                p.requires_grad_(False)
            groups = [{"params": routers, "lr": router_lr}]
            if params:
                groups.append({"params": params, "lr": lr})
            for grp in groups:
                for p in grp["params"]:
                    p.requires_grad_(True)
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(n, warm=min(10, n // 10)))
            model.train()
            bar = tqdm(range(n), desc=f"mod-threshold: train {phase}", disable=not progress, leave=False)
            for _ in bar:
                c_t = 1.0 - (1.0 - capacity) * min(1.0, (step + 1) / ramp_steps)
                b = batches[step % len(batches)]
                logits, rec = forward(b)
                loss = loss_of(logits, b)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"mod-threshold calibrate: loss {loss.item()} at step {step}; lower lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g_ in groups for p in g_["params"]], 1.0)
                opt.step()
                sched.step()
                rates = []
                with torch.no_grad():
                    for i, (g, keep, real, forced) in rec.items():
                        shift = quantile_shift(g.detach(), real, c_t, cfg.threshold, forced)
                        gated[i].router.bias += (1 - bias_momentum) * shift
                        rates.append(
                            float(keep.float().mean() if real is None else keep[real].float().mean())
                        )
                result["losses"].append(loss.item())
                bar.set_postfix(
                    loss=f"{loss.item():.3f}", cap=f"{c_t:.2f}", keep=f"{sum(rates) / len(rates):.2f}"
                )
                step += 1
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
        model.train(was_training)
        state.record = None
    teacher = None  # free the dense copy before measuring
    result["bias_shifts"] = fit_biases(model, fit_on, capacity)
    cfg.capacity = capacity
    update_config(model, cfg)
    result["steps"] = {"routers": router_steps, train: steps}
    result["tokens"] = sum(int(batches[i % len(batches)]["input_ids"].numel()) for i in range(total))
    result["keep_rates"] = keep_rates(model, fit_on)
    if holdout is not None:
        result["keep_rates_holdout"] = keep_rates(model, holdout)
        result["holdout_ppl"] = math.exp(mean_nll(model, holdout))
    measured = result.get("keep_rates_holdout", result["keep_rates"])
    for i, layer in gated.items():  # shown by condify.describe
        layer._condify_patch.info["keep_rate"] = round(measured[i], 3)
    return result


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
    Cost: four forwards of the data per candidate.
    """
    from ...training import as_batches

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
        for i in tqdm(candidates, desc="mod-threshold: layer sensitivity", disable=not progress, leave=False):
            modify(model, "mod-threshold", **{**options, "layers": [i], "capacity": capacity})
            try:
                init_routers(model, batches)
                fit_biases(model, batches, capacity)
                state, total = _state(model), 0.0
                for b in holdout:
                    state.keep_all = True
                    try:
                        ref = model(**b, use_cache=False).logits
                    finally:
                        state.keep_all = False
                    total += float(kl_loss(model(**b, use_cache=False).logits, ref, b))
                out[i] = total / len(holdout)
            finally:
                unmodify(model, "mod-threshold")
    finally:
        model.train(was_training)
    return out


def least_sensitive_layers(
    model: nn.Module, batches: list[Batch] | Any, num: int, **kwargs: Any
) -> list[int]:
    """The ``num`` layers whose gating costs least by :func:`layer_sensitivity` (same arguments), sorted."""
    sens = layer_sensitivity(model, batches, **kwargs)
    if not 1 <= num <= len(sens):
        raise ConfigError(f"least_sensitive_layers: `num` must be in [1, {len(sens)}], got {num}")
    return sorted(sorted(sens, key=sens.__getitem__)[:num])
