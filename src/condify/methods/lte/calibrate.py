"""Data-dependent step of lte: two stages, soft then hard (Learn To be Efficient, arXiv 2402.06126).

0. **Router warm start** (``router_init="regression"``, stage 1 only): each router is set by ridge
   regression of its experts' standardised log output norms on the MLP inputs of the dense model (up
   to ``init_tokens`` calibration tokens; closed form, seconds), then scaled so that on those tokens a
   fraction ``1 - target_sparsity`` of each layer's expert scores is above the threshold. Stage 1 then
   starts at the target with routers that already rank experts, instead of at "keep everything"
   (weight 0), which a few dozen steps cannot walk far from. ``"none"`` trains from the modify init.
1. **Soft** (``stage="soft"`` or ``"both"``): the model frozen, every MLP computes
   ``sum_e s_e / s0 * expert_e(x)`` (mode ``"soft"``) and the routers are trained (AdamW; weights at
   ``soft_lr``, biases at ``soft_bias_lr``) on ``KL(dense || model)`` (``distill``; the LM loss
   otherwise) ``+ eta * mean(s) + separation * mean(d / ((s - tau)^2 + d))`` (``d = 0.01``: the LTE
   separation term ``1/(s - 0.5)^2`` with a floor, bounded, so scores leave the threshold's
   neighbourhood and the hard rule of stage 2 computes what stage 1 trained). ``eta`` is not a knob
   to search: a controller moves ``log eta`` by ``eta_gain * (f - (1 - target_sparsity))`` after each
   step, ``f`` the batch's hard executed fraction (``s >= tau``) over all converted MLPs.
   Then (``fit_threshold``) one threshold for every layer is fitted by bisection on up to
   ``fit_tokens`` calibration tokens, in hard mode (twice: later layers see earlier layers' routing),
   so the hard executed fraction on the calibration data is the target; the layers keep the
   allocation the routers learned (a sensitive layer keeps more experts).
2. **Hard** (``stage="hard"`` or ``"both"``): routers frozen, ``s >= tau`` selects, and
   the model (``hard_params="all"``: every weight but the routers; ``"mlp"``: the converted MLPs) is
   fine-tuned under its own routing (mode ``"masked"``: exactly the hard function, differentiable),
   KL to dense. This is the step that closes the soft-to-hard gap (dynamic-k's routed fine-tune).
   With ``hold_target`` (default) the shared threshold tracks the target during the fine-tune (the
   routers' inputs drift as the layers below them train, and the executed fraction with them).

Budget rule (one batch per step, over the fit batches, i.e. without the hold-out): ``soft_steps``
defaults to one pass, so no router is trained twice on the same batch; ``hard_steps`` defaults to
:func:`condify.training.recovery_steps` (1-4 whole passes sized to the data, as dynamic-k's routed
fine-tune), and over several passes the model ends at the pass that scored best on the hold-out
(``hard_passes``). Its rate is quoted for weights of RMS 0.2 (``hard_lr_scale="weights"``, as
dynamic-k's); it runs at ``hard_lr`` and at ``hard_lr_choice`` x ``hard_lr`` (None: only the first)
from the same start and keeps the one that scores better on the hold-out, as dynamic-k's routed
fine-tune (Gemma-3-270M at 75 % executed: x1.296 at 3e-4, x1.197 at 1e-4). More soft steps than fit
batches must be asked for explicitly (they cycle, and the result reports ``passes``).
The teacher (``distill=True``) is the model as ``calibrate`` received it, without any condify method.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from ...batches import first_tokens, real_tokens
from ...config import ConfigError, Options, option
from ...convert import applied_configs, update_config
from ...run import RATE_CHOICE, Run, lr_factors
from ...tracking import track
from ...training import LR_SCALES, Batch, distill_loss, mean_nll, recovery_steps, short_warmup
from ..dynamic_k.routers import record_norms, ridge
from .config import LteConfig
from .modules import METHOD, converted, mode, recording, set_threshold

log = logging.getLogger("condify")
MIN_TOKENS = 256  # calibration tokens (outside the hold-out) below which calibrate refuses to run
SEP_FLOOR = 0.01
HOLD_GAIN = 2.0  # stage 2 threshold controller: logit(tau) step per unit of executed-fraction error
PARAMS = ("all", "mlp")


@dataclasses.dataclass
class LteCalibration(Options):
    """Options of lte's ``calibrate`` (see the module docstring)."""

    owner = "lte calibrate"

    target_sparsity: float | None = option(None, ge=0.0, lt=1.0)
    stage: str = option("both", choices=("both", "soft", "hard"))
    distill: bool = True
    router_init: str = option("regression", choices=("regression", "none"))
    init_tokens: int = option(2048, ge=1)
    soft_steps: int | None = option(None, ge=0)
    soft_lr: float = option(1e-3, ge=0.0)
    soft_bias_lr: float = option(1e-2, ge=0.0)
    eta: float = option(0.1, gt=0.0)
    eta_gain: float = option(5.0, ge=0.0)
    separation: float = option(0.1, ge=0.0)
    fit_threshold: bool = True
    fit_tokens: int = option(2048, ge=1)
    hard_steps: int | None = option(None, ge=0)
    hard_lr: float = option(3e-4, ge=0.0)
    hard_lr_choice: float | None = option(RATE_CHOICE, gt=0.0)
    hard_lr_scale: str = option("weights", choices=LR_SCALES)
    hard_params: str = option("all", choices=PARAMS)
    hold_target: bool = True


def _cfg(model: nn.Module) -> LteConfig:
    return next(c for c in applied_configs(model) if c.method == METHOD)  # type: ignore[return-value]


def _trainable(model: nn.Module, params: str) -> list[nn.Parameter]:
    """Everything but the routers (``"all"``), or the converted MLPs' own weights (``"mlp"``)."""
    if params == "all":
        return [q for n, q in model.named_parameters() if ".router." not in n]
    return [q for _, m in converted(model) for n, q in m.named_parameters() if not n.startswith("router.")]


@torch.no_grad()
def init_routers(
    model: nn.Module, batches: list[Batch], executed: float, threshold: float
) -> dict[str, float]:
    """Stage 0: ridge regression of standardised log expert norms, scaled so ``executed`` of each layer's
    scores are ``>= threshold`` on ``batches``. Returns the mean R^2 of the regression."""
    sites = converted(model)
    with mode(model, "original"):
        recorded = record_norms(model, sites, batches)
    r2 = []
    logit_tau = math.log(threshold / (1 - threshold))
    for p, m in sites:
        x, y = recorded.pop(p)
        weight, bias, fit = ridge(x, y)
        r2.append(fit)
        z = x.double() @ weight.t() + bias
        zs = z.flatten().float().sort().values  # (torch.quantile refuses more than 16M values)
        pos = (1 - executed) * (zs.numel() - 1)  # linear interpolation, as torch.quantile
        lo = int(pos)
        hi_ = min(lo + 1, zs.numel() - 1)
        q = zs[lo] + (pos - lo) * (zs[hi_] - zs[lo]) if executed < 1 else zs[0] - 1
        scale = 2.0 / z.std().clamp(min=1e-6)  # logits with std 2: spread over (0, 1), not saturated
        r = m.router
        r.weight.copy_((scale * weight).to(r.weight.dtype))
        r.bias.copy_((scale * (bias - q) + logit_tau).to(r.bias.dtype))
    return {"router_init_r2": sum(r2) / max(1, len(r2))}


@torch.no_grad()
def fit_threshold(
    model: nn.Module, batches: list[Batch], executed: float, rounds: int = 2
) -> tuple[float, float]:
    """One threshold for every layer, so that the hard executed fraction on ``batches`` is ``executed``.

    Bisection in logit space on the scores recorded in hard mode; ``rounds`` times, since the inputs of
    later layers depend on the routing of earlier ones. Returns the threshold and the executed fraction
    it gives on the last round's scores."""
    tau, frac = float(converted(model)[0][1].expert_layout.tau), float("nan")
    for _ in range(rounds):
        with mode(model, "hard"), recording(model) as recs:
            for b in batches:
                model(**b, use_cache=False)
        scores = torch.cat([torch.cat(r).flatten() for r in recs]).float()
        lo, hi = -30.0, 30.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if float((scores >= torch.sigmoid(torch.tensor(mid))).float().mean()) > executed:
                lo = mid
            else:
                hi = mid
        tau = float(torch.sigmoid(torch.tensor(hi)).clamp(1e-6, 1 - 1e-6))
        frac = float((scores >= tau).float().mean())
        set_threshold(model, tau)
    return tau, frac


def soft_terms(s: torch.Tensor, tau: float, eta: float, separation: float) -> torch.Tensor:
    """Stage 1's auxiliary loss on soft scores ``s``: ``eta * mean(s) + separation * mean(d / ((s - tau)^2 + d))``."""
    return eta * s.mean() + separation * (SEP_FLOOR / ((s - tau) ** 2 + SEP_FLOOR)).mean()


def next_eta(eta: float, executed_now: float, executed: float, gain: float) -> float:
    """Stage 1's eta controller: ``log eta += gain * (executed_now - executed)``, within [1e-4, 1e4]."""
    return min(1e4, max(1e-4, eta * math.exp(gain * (executed_now - executed))))


def hold_threshold(model: nn.Module, logit: float, executed_now: float, executed: float) -> float:
    """Stage 2's threshold controller: ``logit(tau) += HOLD_GAIN * (executed_now - executed)``, the new
    shared threshold set on every converted MLP; returns the new logit."""
    logit += HOLD_GAIN * (executed_now - executed)
    set_threshold(model, min(1 - 1e-6, max(1e-6, 1 / (1 + math.exp(-logit)))))
    return logit


class LteTraining:
    """lte in a user's training loop (:func:`condify.integrations.attach`), after the two stages of
    ``calibrate``. In mode ``"soft"`` the loss term is stage 1's (:func:`soft_terms`, ``eta``,
    ``separation``) and ``eta`` follows :func:`next_eta` after each step (``eta_gain``); in the other
    modes there is no loss term and, with ``hold_target``, the shared threshold follows
    :func:`hold_threshold` (stage 2's controller). Both aim at ``1 - target_sparsity`` executed (default:
    the config's target; without one nothing is held). The executed fraction of each step is averaged
    over data-parallel ranks, so every replica sets the same threshold."""

    def __init__(self, model: nn.Module, opts: LteCalibration) -> None:
        from ...integrations import RecordList

        cfg = _cfg(model)
        target = cfg.target_sparsity if opts.target_sparsity is None else opts.target_sparsity
        self.model, self.sites = model, converted(model)
        self.executed = None if target is None else 1.0 - target
        self.eta, self.gain = opts.eta, opts.eta_gain
        self.separation, self.hold = opts.separation, opts.hold_target
        self.states = [m._condify_patch.state for _, m in self.sites]
        self.recs: list[list[torch.Tensor]] = [RecordList() for _ in self.sites]

    def _soft(self) -> bool:
        return any(st.mode == "soft" for st in self.states)

    def begin_forward(self) -> None:
        for st, r in zip(self.states, self.recs, strict=True):
            if st.record is None or st.record is r:  # calibrate's own recording wins
                r.clear()
                st.record = r

    def loss(self) -> torch.Tensor | None:
        soft = [torch.cat(r).flatten() for st, r in zip(self.states, self.recs, strict=True)
                if r and st.mode == "soft"]  # fmt: skip
        if not soft:
            return None
        return soft_terms(
            torch.cat(soft), float(self.sites[0][1].expert_layout.tau), self.eta, self.separation
        )

    def after_step(self) -> dict[str, float]:
        from ...integrations import reduce_mean

        ran = total = 0.0
        for (_, m), r in zip(self.sites, self.recs, strict=True):
            if r:
                sc = torch.cat(r).detach()
                ran += float((sc >= m.expert_layout.tau).sum())
                total += sc.numel()
            r.clear()
        (f,), (n,) = reduce_mean([ran / total if total else 0.0], [total])
        out = {"executed": f if n else float("nan")}
        if not n or self.executed is None:
            return out
        if self._soft():
            self.eta = next_eta(self.eta, f, self.executed, self.gain)
            out["eta"] = self.eta
        elif self.hold:
            tau = float(self.sites[0][1].expert_layout.tau)
            hold_threshold(self.model, math.log(tau / (1 - tau)), f, self.executed)
            out["threshold"] = float(self.sites[0][1].expert_layout.tau)
        return out

    def close(self) -> None:
        for st, r in zip(self.states, self.recs, strict=True):  # the states: also after unmodify
            if st.record is r:
                st.record = None
            r.clear()


def soft_stage(model: nn.Module, run: Run, teacher: nn.Module | None, o: LteCalibration, executed: float,
               steps: int) -> dict[str, Any]:  # fmt: skip
    """Stage 1: train the routers in soft mode with the eta controller; returns losses and eta."""
    sites = converted(model)
    tau = float(sites[0][1].expert_layout.tau)
    state = {"eta": o.eta, "f": 1.0}
    fs: list[float] = []

    def extra() -> torch.Tensor:
        s = torch.cat([torch.cat(r).flatten() for r in recs])
        for r in recs:
            r.clear()
        state["f"] = float((s.detach() >= tau).float().mean())
        return soft_terms(s, tau, state["eta"], o.separation)

    def after(step: int, loss: float) -> str:
        fs.append(state["f"])
        state["eta"] = next_eta(state["eta"], state["f"], executed, o.eta_gain)
        return f"executed={state['f']:.2f} eta={state['eta']:.3g}"

    routers = [m.router for _, m in sites]
    groups = [
        {"params": [r.weight for r in routers], "lr": o.soft_lr},
        {"params": [r.bias for r in routers], "lr": o.soft_bias_lr},
    ]
    with mode(model, "soft"), recording(model) as recs:
        losses = run.train(
            groups, steps, distill_loss(teacher, extra=extra), after_step=after, desc="lte soft", warmup=0
        )
    return {"soft_loss": (losses[0], losses[-1]) if losses else None, "eta": state["eta"],
            "soft_executed_last": fs[-1] if fs else None}  # fmt: skip


def hard_stage(
    model: nn.Module, run: Run, teacher: nn.Module | None, o: LteCalibration, executed: float, steps: int
) -> dict[str, Any]:
    """Stage 2: fine-tune the model under its own hard routing (mode ``"masked"``), routers frozen.

    The routers' inputs change as the layers below them train, so the executed fraction drifts
    (measured on SmolLM2 at a 50 % target: 50 % -> 42.5 % on held-out text in 40 steps). With
    ``hold_target`` (default) the shared threshold follows the batch's executed fraction
    (``logit(tau) += 2 * (f - target)`` after each step), so the model is tuned with the routing it ends
    with, at the target: x1.27 @ 50.3 % instead of x1.42 @ 42.5 % with the threshold fixed
    (``benchmarks/results/lte.md``). ``hold_target=False`` keeps the thresholds of stage 1."""
    sites = converted(model)
    state = {
        "logit": math.log(float(sites[0][1].expert_layout.tau) / (1 - float(sites[0][1].expert_layout.tau)))
    }
    fs: list[float] = []

    def after(step: int, loss: float) -> str:
        scores = [torch.cat(r) for r in recs]
        for r in recs:
            r.clear()
        taus = [m.expert_layout.tau for _, m in sites]
        f = sum(float((sc >= t).sum()) for sc, t in zip(scores, taus, strict=True)) / sum(
            sc.numel() for sc in scores
        )
        fs.append(f)
        if o.hold_target:
            state["logit"] = hold_threshold(model, state["logit"], f, executed)
        return f"executed={f:.2f}"

    base = distill_loss(teacher)

    def loss_fn(m: nn.Module, b: Batch, step: int) -> torch.Tensor:
        for r in recs:  # only this step's scores: not those of a held-out pass evaluation (best_pass)
            r.clear()
        return base(m, b, step)

    with mode(model, "masked"), recording(model) as recs:
        losses = run.train(
            _trainable(model, o.hard_params), steps, loss_fn, after_step=after, lr=o.hard_lr,
            lr_scale=o.hard_lr_scale, warmup=short_warmup(steps), desc="lte hard", best_pass=True,
        )  # fmt: skip
    out: dict[str, Any] = {"hard_loss": (losses[0], losses[-1]), "hard_executed": (fs[0], fs[-1])}
    if o.hold_target:
        out["threshold_after_hard"] = float(sites[0][1].expert_layout.tau)
    return out


def calibrate(model: nn.Module, run: Run, opts: LteCalibration) -> dict[str, Any]:
    """Run the stages of the module docstring; returns their measurements.

    Keys: ``router_init_r2``, ``soft_loss`` (first, last), ``eta`` (final), ``soft_executed_last``;
    ``threshold`` and ``executed_fit`` (hard, on the calibration tokens it was fitted on);
    ``ppl_after_soft`` and ``executed_after_soft`` (held-out, hard mode, when stage 2 follows);
    ``hard_loss`` and ``hard_executed`` (first, last batch of stage 2), ``threshold_after_hard``
    (``hold_target``), ``hard_passes``; ``soft_steps``, ``hard_steps``, ``passes``. ``condify.calibrate``
    adds ``ppl``, ``executed`` and ``executed_per_layer`` (hard mode, held-out)."""
    cfg, o, fit = _cfg(model), opts, run.fit
    n_tokens = real_tokens(fit)
    if n_tokens < MIN_TOKENS:
        raise ConfigError(
            f"lte calibrate: only {n_tokens} calibration tokens outside the hold-out; need at least "
            f"{MIN_TOKENS} (e.g. 4 sequences of 256 tokens)"
        )
    soft, hard = o.stage in ("both", "soft"), o.stage in ("both", "hard")
    target = o.target_sparsity if o.target_sparsity is not None else cfg.target_sparsity
    if hard and not soft:
        if cfg.calibrated is None:
            raise ConfigError(
                "lte calibrate: stage='hard' fine-tunes the model under routers trained by stage 1, but "
                "these routers were never trained; run stage='soft' or stage='both' first"
            )
        if o.target_sparsity is not None and o.target_sparsity != cfg.target_sparsity:
            raise ConfigError(
                f"lte calibrate: target_sparsity={o.target_sparsity} cannot be met by stage='hard': it "
                f"freezes routers trained for {cfg.target_sparsity}; run stage='both' for a new target"
            )
    if target is None:
        raise ConfigError("lte calibrate: pass `target_sparsity` (the fraction of expert compute to skip)")
    experts = min(m._condify_patch.state.experts for _, m in converted(model))
    executed = 1.0 - target
    if soft and executed < 1.0 / experts:
        raise ConfigError(
            f"lte calibrate: target_sparsity={target} cannot be met: it executes less than one expert per "
            f"token on average ({experts} experts per MLP, so at most {1 - 1 / experts:.3f}); ask for less "
            f"sparsity or use smaller experts"
        )
    soft_steps = (len(fit) if o.soft_steps is None else o.soft_steps) if soft else 0
    hard_steps = (recovery_steps(fit) if o.hard_steps is None else o.hard_steps) if hard else 0
    passes = max(soft_steps, hard_steps) / len(fit)
    asked = max(soft_steps, hard_steps if o.hard_steps is not None else 0)
    if asked > len(fit):
        log.warning("lte calibrate: %d steps on %d fit batches: %.1f passes over the data", asked,
                    len(fit), asked / len(fit))  # fmt: skip
    res: dict[str, Any] = {"soft_steps": soft_steps, "hard_steps": hard_steps,
                           "passes": passes}  # fmt: skip
    was_training = model.training
    model.eval()
    teacher = run.teacher() if o.distill and (soft_steps or hard_steps) else None
    if soft:
        set_threshold(model, cfg.threshold)
        if o.router_init == "regression":
            res.update(init_routers(model, first_tokens(fit, o.init_tokens), executed, cfg.threshold))
        res.update(soft_stage(model, run, teacher, o, executed, soft_steps))
        model.eval()
        if o.fit_threshold:
            res["threshold"], res["executed_fit"] = fit_threshold(
                model, first_tokens(fit, o.fit_tokens), executed
            )
        cfg = cfg.replace(target_sparsity=target, calibrated="soft")
        update_config(model, cfg)
        if run.held and hard_steps:
            with mode(model, "hard"), track(model) as t:
                res["ppl_after_soft"] = math.exp(mean_nll(model, run.held))
            res["executed_after_soft"] = t.fraction(METHOD)
    if hard and hard_steps:
        hard, kept = run.keep_if_better(
            lambda lr: hard_stage(model, run, teacher, dataclasses.replace(o, hard_lr=lr), executed, hard_steps),
            o.hard_lr, "lte hard", factors=lr_factors(o.hard_lr_choice),
        )  # fmt: skip
        res.update(hard or {})
        res["hard_lr"], res["hard_tried"] = kept["lr"], kept["tried"]
        res["hard_passes"] = run.passes.get("lte hard")  # held-out NLL per pass, the pass kept
        model.eval()
        update_config(model, cfg.replace(calibrated="hard"))
    model.train(was_training)
    return res
