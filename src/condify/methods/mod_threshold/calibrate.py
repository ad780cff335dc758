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
the first pass over the fit batches (router steps included), and holds the target after it (with a lag
while the layers train). By default the model trains for ``TRAIN_TOKENS`` tokens in whole passes
(1-``TRAIN_MAX_PASSES``, twice the other methods' recovery fine-tune: :func:`condify.training.recovery_steps`)
and ends at the pass that scored best on the hold-out, every score taken with the biases fitted to the
target (:func:`.routing.at_capacity`). With ``patience=N`` it stops after N passes in a row that do not
beat the best (``results/early_stop.md``: with 2, the same pass kept and a third of the time on Gemma-3,
but SmolLM2 at capacity 0.75 stopped before its best pass). After training, biases are fitted once more
layer by layer on the calibration data (:func:`.routing.fit_biases`), so the hard keep-rate of every gated
layer equals the target on that data. The training-free tools (router init, bias fitting, layer choice)
live in :mod:`.routing`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...adapters import Adapter, get_adapter
from ...config import Options, option
from ...convert import applied_configs, update_config
from ...run import Run
from ...training import (
    LR_SCALES,
    RECOVERY_MAX_PASSES,
    RECOVERY_TOKENS,
    Batch,
    distill_loss,
    recovery_steps,
    short_warmup,
)
from .modules import quantile_shift
from .routing import (
    at_capacity,
    choose_layers,
    fit_biases,
    gated_layers,
    init_routers,
    keep_rates,
    router_state,
)

log = logging.getLogger("condify")

_TRAIN = ("all", "gated", "routers")
# Default training length: twice the recovery fine-tunes' (RECOVERY_TOKENS, 4 passes). mod-threshold
# learns which tokens skip while the layers adapt, and on small data gains from passes beyond 4:
# SmolLM2 + shakespeare, capacity 0.75, 7k tokens a pass: 4 passes x1.123, 8 passes x1.091 (test split;
# benchmarks/results/rates_and_passes.md).
TRAIN_TOKENS = 2 * RECOVERY_TOKENS
TRAIN_MAX_PASSES = 2 * RECOVERY_MAX_PASSES


Reduce = Callable[[list[float], list[float]], tuple[list[float], list[float]]]


@torch.no_grad()
def hold_capacity(
    gated: dict[int, nn.Module],
    rec: dict[int, Any],
    capacity: float,
    threshold: float,
    momentum: float,
    reduce: Reduce | None = None,
) -> float:
    """The keep-rate controller of one training step: each gated layer's router bias moves by
    ``(1 - momentum)`` x the logit shift that would have kept a fraction ``capacity`` of the tokens
    ``rec`` recorded (``RouterState.record`` of the last forward), and ``rec`` is cleared. Returns the
    mean hard keep-rate over the recorded layers. ``reduce(values, weights)`` gives weighted means over
    data-parallel ranks and the total weights, so every replica moves its biases alike (None: one process)."""
    layers = sorted(gated)
    shifts, rates, counts = [0.0] * len(layers), [0.0] * len(layers), [0.0] * len(layers)
    for j, i in enumerate(layers):
        if i not in rec:
            continue
        g, keep, real, forced = rec[i]
        kept = keep if real is None else keep[real]
        if kept.numel():
            shifts[j] = quantile_shift(g.detach(), real, capacity, threshold, forced)
            rates[j], counts[j] = float(kept.float().mean()), float(kept.numel())
    rec.clear()
    if reduce is not None:  # one collective: per-layer means of shifts and rates, tokens over all ranks
        means, totals = reduce(shifts + rates, counts + counts)
        n = len(layers)
        shifts, rates, counts = means[:n], means[n:], totals[:n]
    for i, shift, n in zip(layers, shifts, counts, strict=True):
        if n:
            gated[i].router.bias += (1 - momentum) * shift
    measured = [r for r, n in zip(rates, counts, strict=True) if n]
    return sum(measured) / len(measured) if measured else float("nan")


class CapacityHold:
    """mod-threshold in a user's training loop (:func:`condify.integrations.attach`): no loss term (the
    straight-through gate trains the routers through the LM loss); after each optimiser step
    :func:`hold_capacity` moves the router biases so the keep-rate holds ``capacity`` (default: the
    config's; calibrate's controller without its ramp), ``bias_momentum`` as in calibrate. While the
    layers train, the keep-rate of the training forwards lags ``capacity`` (``after_step`` reports it):
    :func:`.routing.fit_biases` on a few batches sets the rate the model then runs at."""

    def __init__(self, model: nn.Module, opts: ModThresholdCalibration) -> None:
        from ...integrations import Records

        cfg = next(c for c in applied_configs(model) if c.method == "mod-threshold")
        self.gated, self.state = gated_layers(model), router_state(model)
        self.capacity = cfg.capacity if opts.capacity is None else opts.capacity
        self.threshold, self.momentum = cfg.threshold, opts.bias_momentum
        self.rec: dict[int, Any] = Records()

    def begin_forward(self) -> None:
        if self.state.record is None or self.state.record is self.rec:  # calibrate's own record wins
            self.rec.clear()
            self.state.record = self.rec

    def loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> dict[str, float]:
        from ...integrations import reduce_mean

        rate = hold_capacity(self.gated, self.rec, self.capacity, self.threshold, self.momentum, reduce_mean)
        return {"keep_rate": rate, "capacity": self.capacity}

    def close(self) -> None:
        if self.state.record is self.rec:
            self.state.record = None
        self.rec.clear()


def _params(
    model: nn.Module, adapter: Adapter, gated: dict[int, nn.Module], train: str
) -> list[nn.Parameter]:
    if train == "routers":
        return []
    layers = adapter.layer_list(model)
    chosen = gated.values() if train == "gated" else layers
    return [p for layer in chosen for n, p in layer.named_parameters() if not n.startswith("router.")]


@dataclasses.dataclass
class ModThresholdCalibration(Options):
    """Options of mod-threshold's ``calibrate``.

    ``capacity`` defaults to the config's (and is recorded there). ``router_steps`` first train the
    routers alone (model frozen), then ``steps`` (default: ``TRAIN_TOKENS`` tokens in 1-8 whole passes
    over the fit batches, ending at the pass that scored best on the hold-out) train routers and
    model together; the capacity ramp (over the first ``ramp`` fraction of the router steps and the
    first pass) runs over both. ``train``: ``"all"`` decoder layers, ``"gated"``
    layers only, or ``"routers"`` only. ``init`` gives routers that are still at their init (weight 0)
    the training-free start of :func:`init_routers`. The first ``fit_batches`` batches fit the biases
    (:func:`fit_biases`) before and after training. Loss: KL to the dense model (``distill``) or LM,
    plus ``lm_weight`` x LM. Learning rates, measured on SmolLM2 at capacity 0.75 (120 steps of
    2 x 128 tokens): ``router_lr`` 1e-3 made the KL loss *rise* after the capacity ramp (Adam moves
    every router weight by ~lr per step, and the residual stream has a few huge coordinates, so the
    routing decisions drift away from the training-free init faster than the layers can follow):
    x1.81 held-out perplexity; 1e-5 kept the init's decisions and let the layers adapt: x1.17. ``lr``
    (decoder layers) 3e-4 beat 5e-5 (x2.06 vs x3.04 after 40 steps, router_lr 1e-3). The training is
    kept only if it beats, on the held-out batches, the training-free routers with biases fitted to the
    same capacity; else it is retried once at a tenth of both rates, else dropped for that training-free
    model (``Run.keep_if_better``; ``condify.calibrate(..., keep_if_better=False)`` keeps it as trained).
    ``lr`` is quoted for weights of RMS 0.2: with ``lr_scale="weights"`` (default) each of the model's
    own matrices trains at ``lr`` x its RMS / 0.2 (routers at ``router_lr`` as given), warm-up over a
    quarter of the steps; on Gemma-3-270M (matrices of RMS 0.02-0.04) x2.005 -> x1.856 at capacity 0.75
    and x6.147 -> x4.065 at 0.5 (``benchmarks/results/frontier-gemma-python-docs.md``).
    ``patience``: stop the training after that many passes in a row that do not beat the best one
    (None: every pass runs). When the config's ``auto_layers`` is set (``modify`` without ``layers=``),
    the gated layers are first chosen on the first ``select_batches`` fit batches
    (:func:`.routing.choose_layers`).
    """

    owner = "mod-threshold calibrate"

    capacity: float | None = option(None, gt=0.0, le=1.0)
    steps: int | None = option(None, ge=0)
    router_steps: int = option(0, ge=0)
    train: str = option("all", choices=_TRAIN)
    lr: float = option(3e-4, ge=0.0)
    lr_scale: str = option("weights", choices=LR_SCALES)
    router_lr: float = option(1e-5, ge=0.0)
    distill: bool = True
    lm_weight: float = option(0.0, ge=0.0)
    ramp: float = option(0.5, ge=0.0, le=1.0)
    bias_momentum: float = option(0.5, ge=0.0, lt=1.0)
    init: bool = True
    patience: int | None = option(None, ge=1)
    fit_batches: int = option(8, ge=1)
    select_batches: int = option(2, ge=1)


def calibrate(model: nn.Module, run: Run, opts: ModThresholdCalibration) -> dict[str, Any]:
    """Train routers (and the model, per ``train``) to keep a fraction ``capacity`` of tokens per
    layer. Returns per-layer keep-rates (fit and held-out batches), losses, per training step the
    scheduled capacity and its forward's mean keep-rate (``train_keep``, before the step's bias move) and
    bias shifts."""
    cfg = next(c for c in applied_configs(model) if c.method == "mod-threshold")
    capacity = cfg.capacity if opts.capacity is None else opts.capacity
    chosen = choose_layers(model, run, cfg, capacity, opts.select_batches) if cfg.auto_layers else None
    adapter = get_adapter(model)
    gated, state, batches = gated_layers(model), router_state(model), run.fit
    routers = [p for layer in gated.values() for p in layer.router.parameters()]
    steps = recovery_steps(run.fit, TRAIN_TOKENS, TRAIN_MAX_PASSES) if opts.steps is None else opts.steps
    total = opts.router_steps + steps
    fit_on = batches[: opts.fit_batches]
    ramp_steps = max(1, round(opts.ramp * (opts.router_steps + min(steps, len(run.fit)))))
    if opts.init and all(not layer.router.weight.any() for layer in gated.values()):
        init_routers(model, fit_on)
        fit_biases(model, fit_on, 1.0 - (1.0 - capacity) / ramp_steps if total else capacity)
    base = distill_loss(run.teacher() if opts.distill and total else None, lm_weight=opts.lm_weight)
    run.eval_mode = lambda: at_capacity(model, fit_on, capacity)  # every held-out score at the target
    result: dict[str, Any] = {
        "capacity": capacity,
        **({"layers": sorted(chosen), "layer_sensitivity": chosen} if chosen else {}),
        "train": opts.train,
        "distill": opts.distill,
        "losses": [],
        "train_keep": [],
    }
    step = 0
    rec: dict[int, Any] = {}

    def loss_fn(m: nn.Module, b: Batch, _: int) -> torch.Tensor:
        state.record = rec
        try:
            return base(m, b, _)
        finally:
            state.record = None

    def after_step(_: int, loss: float) -> str:
        nonlocal step
        c_t = 1.0 - (1.0 - capacity) * min(1.0, (step + 1) / ramp_steps)
        keep = hold_capacity(gated, rec, c_t, cfg.threshold, opts.bias_momentum)
        result["losses"].append(loss)
        result["train_keep"].append((round(c_t, 4), round(keep, 4)))
        step += 1
        return f"cap={c_t:.2f} keep={keep:.2f}"

    def attempt(scale: float) -> Any:  # both phases at ``scale`` x the learning rates, then the final biases
        nonlocal step
        step, result["losses"], result["train_keep"] = 0, [], []
        for phase, n, params in (
            ("routers", opts.router_steps, []),
            (opts.train, steps, _params(model, adapter, gated, opts.train)),
        ):
            groups = [{"params": routers, "lr": opts.router_lr * scale}] + (
                [{"params": params, "lr": opts.lr * scale}] if params else []
            )
            run.train(
                groups, n, loss_fn, after_step=after_step, lr_scale=opts.lr_scale, warmup=short_warmup(n),
                desc=f"mod-threshold: train {phase}", best_pass=phase != "routers", patience=opts.patience,
            )  # fmt: skip
        return fit_biases(model, fit_on, capacity)

    if total:  # kept only if it beats the training-free routers at the same capacity on held-out text
        shifts, kept = run.keep_if_better(
            attempt, 1.0, "mod-threshold train", fallback=lambda: fit_biases(model, fit_on, capacity)
        )
        result["lr_factor"], result["tried"] = kept["lr"], kept["tried"]
    else:
        shifts = fit_biases(model, fit_on, capacity)
    run.drop_teacher()  # free the dense copy before measuring
    result["bias_shifts"] = shifts
    cfg = next(c for c in applied_configs(model) if c.method == "mod-threshold")
    update_config(model, cfg.replace(capacity=capacity))
    for layer in gated.values():
        layer._condify_patch.state.config.capacity = capacity
    result["steps"] = {"routers": opts.router_steps, opts.train: steps}
    result["passes"] = run.passes.get(f"mod-threshold: train {opts.train}")  # held-out NLL per pass, kept
    result["keep_rates"] = keep_rates(model, fit_on)
    if run.held:
        result["keep_rates_holdout"] = keep_rates(model, run.held)
    measured = result.get("keep_rates_holdout", result["keep_rates"])
    for i, layer in gated.items():  # shown by condify.describe
        layer._condify_patch.state.keep_rate = round(measured[i], 3)
    return result
