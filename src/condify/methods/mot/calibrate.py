"""Training of mot: MoT training (KL to the dense teacher or LM loss), then transition tuning.

Stages (``condify.calibrate(model, data, stage=...)``):

- ``"mot"``: ``steps`` steps (default: one pass over the calibration batches) of the continuous MoT
  model. ``temperature_end`` anneals every layer's mixing temperature geometrically from its current
  value to ``temperature_end`` over the steps (the paper's schedule before the transition: t toward 0,
  where MoT becomes one-token-per-expert routing).
- ``"transition"``: every MoT layer becomes a token-choice top-k MoE initialised from the MoT weights
  (the experts are the same blocks), recorded in the saved config. Its router is, with
  ``transition_router="regression"`` (default), refit in closed form: ridge regression (no bias: the
  router has none) of the standardised log norms of its experts' outputs on its inputs, recorded on up to
  ``router_tokens`` calibration tokens in the transitioned model (lte's router warm start). The MoT
  controller is trained to mix tokens, not to rank what each expert adds to one: on SmolLM2 at top-12 of
  16, right after the switch (no tuning; 2k test tokens), x1.49 from modify / x1.53 after the MoT pass
  with the controller as router, x1.24 / x1.26 refit. ``"controller"``: the controller is the router
  (the paper). Then
  ``steps`` steps of fine-tuning (default: :func:`condify.training.recovery_steps`, 1-4 passes sized to
  the data, ending at the pass that scored best on the hold-out; warm-up over a quarter of the steps),
  kept only if it lowers the held-out NLL of the untrained transitioned MoE
  (:meth:`~condify.run.Run.keep_if_better`). The KL target is the dense model as the call received
  it (``transition_teacher="dense"``, the default: a pretrained model's own function) or the MoT model as
  it was before the switch (``"mot"``, a frozen copy: for MoT trained from scratch, as in the paper).
- ``"full"`` (the default): ``"mot"`` for ``steps``, then ``"transition"`` for ``transition_steps``: one
  call that ends in the batch-independent model. ``transition_steps`` defaults to 10 % of ``steps`` (at
  least 1; the paper's schedule) when ``steps`` is given, and to ``recovery_steps`` when both are sized
  from the data: on a pretrained model the MoT start is far from dense (x16 on SmolLM2) and the
  transition fine-tune is what wins quality back (``benchmarks/results/mot.md``; with the passes, top-8
  on Gemma-3-270M x2.113 -> x1.546, ``recovery_passes.md``).

``params``: what trains: ``"mlp"`` (the converted MLPs and their controllers), ``"layers"`` (the whole
converted decoder layers), ``"all"``. Controllers train at ``router_lr``. ``lr_scale="weights"``: each of
the model's own matrices trains at ``lr`` x its RMS / 0.2 (:func:`condify.training.scale_to_weights`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ...adapters import get_adapter
from ...batches import first_tokens
from ...config import ConfigError, Options, option
from ...convert import applied_configs
from ...run import Run
from ...training import LR_SCALES, Batch, distill_loss, mean_nll, recovery_steps, short_warmup
from ..dynamic_k.routers import record_norms, ridge
from .config import MoTConfig
from .modules import METHOD, converted, stage
from .transform import set_stage

log = logging.getLogger("condify")

STAGES = ("mot", "transition", "full")


@dataclasses.dataclass
class MoTCalibration(Options):
    owner: ClassVar[str] = "mot calibrate"

    stage: str = option("full", choices=STAGES)
    steps: int | None = option(None, ge=0)
    transition_steps: int | None = option(None, ge=0)
    lr: float = option(1e-4, gt=0.0)
    router_lr: float = option(1e-3, gt=0.0)
    lr_scale: str = option("none", choices=LR_SCALES)
    loss: str = option("kl", choices=("kl", "lm"))
    lm_weight: float = option(0.0, ge=0.0)
    params: str = option("mlp", choices=("mlp", "layers", "all"))
    temperature_end: float | None = option(None, gt=0.0)
    transition_teacher: str = option("dense", choices=("dense", "mot"))
    transition_router: str = option("regression", choices=("regression", "controller"))
    router_tokens: int = option(2048, ge=1)

    def validate(self) -> None:
        if self.transition_steps is not None and self.stage != "full":
            raise ConfigError("mot calibrate: `transition_steps` is for stage='full'; use `steps` otherwise")


def _config(model: nn.Module) -> MoTConfig:
    return next(c for c in applied_configs(model) if c.method == METHOD)  # type: ignore[return-value]


def grouped(batches: list[Batch], group_size: int) -> list[Batch]:
    """``batches`` whose sizes are multiples of ``group_size``: as given, or, when some are not, all their
    sequences (of one length) pooled in order and re-split into batches of ``group_size`` x n (about the
    size given), so MoT trains on full groups. Left-over sequences (fewer than a group) are dropped."""
    G = group_size
    if all(b["input_ids"].shape[0] % G == 0 for b in batches):
        return batches
    n = sum(b["input_ids"].shape[0] for b in batches)
    lengths = sorted({b["input_ids"].shape[1] for b in batches})
    if len(lengths) > 1 or len({tuple(sorted(b)) for b in batches}) > 1 or n < G:
        sizes = sorted({b["input_ids"].shape[0] for b in batches if b["input_ids"].shape[0] % G})
        raise ConfigError(
            f"mot calibrate: calibration batches of size {sizes} are not multiples of group_size={G} and "
            f"cannot be regrouped ({n} sequences of lengths {lengths}); MoT mixes the tokens at one position "
            f"across {G} sequences: pass batches of {G}*n sequences, or at least {G} of one length"
        )
    pooled = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    size = G * max(1, max(b["input_ids"].shape[0] for b in batches) // G)
    end = n - n % G
    log.info("mot calibrate: %d sequences regrouped into batches of %d (group_size=%d)", end, size, G)
    return [{k: v[i : min(i + size, end)] for k, v in pooled.items()} for i in range(0, end, size)]


def param_groups(model: nn.Module, which: str, lr: float, router_lr: float) -> list[dict[str, Any]]:
    """AdamW groups: the controllers at ``router_lr``, the rest of ``which`` at ``lr``."""
    sites = converted(model)
    routers = [p for _, m in sites for p in m.router.parameters()]
    if which == "all":
        pool = list(model.parameters())
    elif which == "layers":
        layers = get_adapter(model).layer_list(model)
        pool = [p for _, m in sites for p in layers[m._condify_patch.state.layer].parameters()]
    else:
        pool = [p for _, m in sites for p in m.parameters()]
    ids = {id(p) for p in routers}
    rest = list({id(p): p for p in pool if id(p) not in ids}.values())
    return [{"params": rest, "lr": lr}, {"params": routers, "lr": router_lr}]


def _annealer(model: nn.Module, steps: int, t_end: float | None):
    if t_end is None:
        return None
    routers = [m.router for _, m in converted(model)]
    start = [float(r.temperature) for r in routers]

    def after(step: int, loss: float) -> str:
        f = (step + 1) / steps
        for r, t0 in zip(routers, start, strict=True):
            r.temperature.fill_(t0 * math.exp(f * (math.log(t_end) - math.log(t0))))
        return f"t={float(routers[0].temperature):.3g}"

    return after


def _train_mot(model: nn.Module, run: Run, opts: MoTCalibration, steps: int) -> list[float]:
    teacher = run.teacher() if opts.loss == "kl" else None
    groups = param_groups(model, opts.params, opts.lr, opts.router_lr)
    loss = distill_loss(teacher, lm_weight=opts.lm_weight)
    return run.train(
        groups, steps, loss, after_step=_annealer(model, steps, opts.temperature_end), desc="mot",
        lr_scale=opts.lr_scale,
    )  # fmt: skip


@torch.no_grad()
def fit_routers(model: nn.Module, batches: list[Batch]) -> float:
    """Refit every transitioned router by ridge regression of its experts' log output norms on its inputs
    (recorded on ``batches`` in the model as it is); returns the mean R^2."""
    sites = converted(model)
    recorded = record_norms(model, sites, batches)
    r2 = []
    for p, m in sites:
        weight, _, fit = ridge(*recorded.pop(p), intercept=False)
        m.router.weight.copy_(weight.to(m.router.weight.dtype))
        r2.append(fit)
    return sum(r2) / max(1, len(r2))


def _transition(model: nn.Module, run: Run, opts: MoTCalibration, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if run.held:
        out["mot_ppl"] = math.exp(mean_nll(model, run.held))
    teacher = None
    if opts.loss == "kl":
        if opts.transition_teacher == "mot":
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        else:
            teacher = run.teacher()
    set_stage(model, _config(model), "moe")
    if opts.transition_router == "regression":
        out["router_r2"] = fit_routers(model, first_tokens(run.fit, opts.router_tokens))
    loss = distill_loss(teacher, lm_weight=opts.lm_weight)

    def attempt(lr: float) -> list[float]:
        groups = param_groups(model, opts.params, lr, opts.router_lr * lr / opts.lr)
        return run.train(
            groups, steps, loss, warmup=short_warmup(steps), desc="transition", best_pass=True,
            lr_scale=opts.lr_scale,
        )  # fmt: skip

    losses, kept = run.keep_if_better(attempt, opts.lr, "mot transition") if steps else ([], {})
    out["transition_losses"] = losses or []
    out["lr_factor"] = None if not kept or kept["lr"] is None else kept["lr"] / opts.lr
    out["transition_passes"] = run.passes.get("transition")  # held-out NLL per pass, the pass kept
    return out


def calibrate(model: nn.Module, run: Run, opts: MoTCalibration) -> dict[str, Any]:
    cfg = _config(model)
    G = cfg.group_size
    current = stage(model)
    if current != "mot":
        raise ConfigError(
            f"mot calibrate: the model is already transitioned (stage {current!r}); there is no further "
            "stage (train it as an ordinary model, or unmodify and modify again)"
        )
    run.fit = grouped(run.fit, G)
    one_pass = len(run.fit)
    steps = one_pass if opts.steps is None else opts.steps
    result: dict[str, Any] = {"stage": opts.stage}
    if opts.stage in ("mot", "full"):
        result["losses"] = _train_mot(model, run, opts, steps)
    if opts.stage in ("transition", "full"):
        if opts.stage == "transition":
            t_steps = recovery_steps(run.fit) if opts.steps is None else opts.steps
        elif opts.transition_steps is not None:
            t_steps = opts.transition_steps
        else:
            t_steps = recovery_steps(run.fit) if opts.steps is None else max(1, round(0.1 * steps))
        result["steps"] = {"mot": steps if opts.stage == "full" else 0, "transition": t_steps}
        result.update(_transition(model, run, opts, t_steps))
    result["temperature"] = {
        m._condify_patch.state.layer: float(m.router.temperature) for _, m in converted(model)
    }
    return result
