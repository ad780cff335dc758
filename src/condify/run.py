"""One ``condify.calibrate`` call: its context (:class:`Run`) and what makes it transactional.

- :class:`Run`: fit / held-out batches, the frozen teacher, the token count, progress; its
  :meth:`Run.train` keeps the best pass, :meth:`Run.keep_if_better` keeps a recovery fine-tune only if
  the held-out NLL does not rise beyond noise (choosing among rates, falling back to smaller ones);
- :func:`snapshot` / :func:`restore`: the whole model put back when a call fails;
- :func:`state_copy` / :func:`put_state` / :func:`paired_change`: the pieces both use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from .batches import Batch, check_batch, real_tokens, vocab_size
from .training import Groups, Loss, frozen_teacher, train

log = logging.getLogger("condify")
T = TypeVar("T")
LR_FALLBACK = (1.0, 0.1)  # recovery fine-tunes: the method's rate, then a tenth of it (Run.keep_if_better)
RATE_CHOICE = 1 / 3  # recovery fine-tunes choose between their rate and this fraction of it (lr_factors)
GUARD_SE = 1.0  # Run.keep_if_better: a held-out NLL rise within this many paired standard errors is noise


def lr_factors(choice: float | None) -> tuple[float | tuple[float, ...], ...]:
    """``Run.keep_if_better`` factors: a choice of the rate and ``choice`` x it (None: the rate alone), then the fallback."""
    return ((1.0,) if choice is None else (1.0, choice), *LR_FALLBACK[1:])


@dataclass
class Run:
    """The context of one ``condify.calibrate`` call, handed to the method's calibrate.

    ``fit``: batches to calibrate on; ``held``: held-out batches (never trained on; the core measures
    the reported quality on them). ``teacher()`` is the frozen dense model as the call received it
    (made once, on first use). :meth:`train` counts the tokens it trains on into ``tokens``.
    ``eval_mode``: an optional context the core measures the held-out quality in (e.g. oracle routing).
    """

    model: nn.Module
    fit: list[Batch]
    held: list[Batch]
    progress: bool = True
    guard: bool = True  # recovery fine-tunes kept only if the held-out NLL drops (:meth:`keep_if_better`)
    tokens: int = 0
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)  # best_pass records (:meth:`train`)
    eval_mode: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    _teacher: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Refuse what cannot calibrate, before anything changes: ids outside the model's vocabulary
        (e.g. batches built by hand) and non-finite weights (training would only spread the NaN)."""
        from .convert import check_finite_weights

        vocab = vocab_size(self.model)
        for name, part in (("calibration data", self.fit), ("calibrate: `holdout`", self.held)):
            for i, b in enumerate(part):
                check_batch(b, i, vocab, name)
        check_finite_weights(self.model, "calibrate")

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = frozen_teacher(self.model)
        return self._teacher

    def drop_teacher(self) -> None:
        """Free the dense copy (e.g. before a memory-hungry measurement)."""
        self._teacher = None

    def train(
        self,
        params: Groups,
        steps: int,
        loss_fn: Loss,
        *,
        batches: list[Batch] | None = None,
        best_pass: bool = False,
        patience: int | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """:func:`train` on ``self.fit`` (or ``batches``), counting the tokens it uses.

        ``best_pass`` (with a hold-out, the guard on, and more than one pass): the held-out NLL is measured
        after every pass over ``batches`` and the model ends at the pass that scored best (every tensor
        of its state put back; one copy of the state is held). Passes that fit the calibration text at
        the cost of other text are undone: Gemma-3-270M + python-docs, dynamic-k at 75 %, 4 passes of
        2.8k tokens raised calibrate's held-out ratio x1.029 -> x1.144 (``results/recovery_passes.md``).
        With ``patience`` (and the selection on), training stops after that many passes in a row that do
        not beat the best one (``stopped``: the passes made); the pass kept is the whole run's whenever no
        later pass would have beaten it. Each pass's held-out NLL and the kept pass are recorded in
        ``passes[desc]``.
        """
        batches = self.fit if batches is None else batches
        desc = kwargs.get("desc", "train")
        if steps > len(batches):
            log.info(
                "%s: %d steps = %.1f passes over %d batches", desc, steps, steps / len(batches), len(batches)
            )
        per_pass, given = len(batches), kwargs.pop("after_step", None)
        select = best_pass and self.guard and bool(self.held) and steps > per_pass
        record: dict[str, Any] = {"held_nll": [], "kept": None, "stopped": None}
        best: dict[str, Any] = {}

        def after_step(step: int, loss: float) -> str | None:
            status = given(step, loss) if given is not None else None
            if (step + 1) % per_pass == 0 or step + 1 == steps:
                nll = self.held_nll()
                record["held_nll"].append(nll)
                if not best or nll < best["nll"]:
                    best.update(nll=nll, passes=(step + 1) / per_pass, state=state_copy(self.model))
                elif patience and (step + 1) / per_pass - best["passes"] >= patience and step + 1 < steps:
                    record["stopped"] = (step + 1) / per_pass
            return status

        losses = train(
            self.model, params, batches, steps, loss_fn, progress=self.progress,
            after_step=after_step if select else given, stop=lambda: record["stopped"] is not None, **kwargs,
        )  # fmt: skip
        if record["stopped"] is not None:
            log.info("%s: stopped after pass %g of %g: %d passes did not beat pass %g", desc,
                     record["stopped"], steps / per_pass, patience, best["passes"])  # fmt: skip
        if select and best:
            put_state(self.model, best["state"])
            record["kept"] = best["passes"]
            self.passes[desc] = record
            if best["passes"] < steps / per_pass:
                log.info("%s: kept pass %g of %g (held-out NLL %s)", desc, best["passes"], steps / per_pass,
                         [round(x, 4) for x in record["held_nll"]])  # fmt: skip
        self.tokens += sum(real_tokens([batches[i % len(batches)]]) for i in range(len(losses)))
        return losses

    def held_nll(self) -> float:
        """Mean NLL of the model on ``held`` as the core measures it (under ``eval_mode`` when set)."""
        return float(self.held_nlls().mean())

    def held_nlls(self) -> torch.Tensor:
        """Per-token NLLs of the model on ``held`` (:func:`condify.evaluate.token_nlls`, under ``eval_mode``)."""
        from .evaluate import token_nlls

        with self.eval_mode() if self.eval_mode is not None else contextlib.nullcontext():
            return token_nlls(self.model, self.held, progress=False)

    def keep_if_better(
        self,
        attempt: Callable[[float], T],
        lr: float,
        desc: str,
        factors: Sequence[float | tuple[float, ...]] = LR_FALLBACK,
        *,
        fallback: Callable[[], None] | None = None,
    ) -> tuple[T | None, dict[str, Any]]:
        """Run a recovery fine-tune ``attempt(lr)`` and keep it unless it raises the held-out NLL beyond noise.

        For stages that keep the compute budget fixed and exist to win quality back (dynamic-k's routed
        fine-tune, lte's hard stage, layer-parallel's paired-layer fine-tune): a step size that suits one
        model can wreck another (Gemma-3-270M at the SmolLM2 rate, unscaled: x1.19 -> x3.19). Tries
        ``lr * f`` for each of ``factors``; an attempt whose held-out NLL rises by more than ``GUARD_SE``
        paired standard errors (of the per-token differences, tokens taken as independent) is undone
        (every tensor of the model's state put back) and the next, smaller rate is tried; when none
        passes, the model stays as it came (result ``None``) and a warning says so. A rise within the
        noise is kept: the held-out slice can be one window (256 tokens on Gemma-3's frontier setting),
        where a fine-tune that lowered the test perplexity x1.662 -> x1.462 raised it 3.261 -> 3.281.
        The held-out batches decide, so the ratio calibrate then reports has been used for this one
        choice (the frontier judges on text calibrate never saw). An entry of ``factors`` that is a tuple
        is a choice: each of its rates is tried from the model as it came and the one with the lowest
        held-out NLL is the entry's attempt (one more copy of the state is held meanwhile); without a
        hold-out only its first rate runs.
        ``fallback``: what the model is without the stage, when that is not the model as it comes (e.g.
        mod-threshold's routers refitted to the final capacity without training); it is applied to the
        model as it came to measure the bar, and again when nothing is kept.
        Returns the kept attempt's result and ``{"lr", "held_nll": (before, after), "tried": [(lr, nll,
        standard error of the change)]}``.
        """
        groups = [f if isinstance(f, tuple) else (f,) for f in factors]
        if not self.held or not self.guard:
            return attempt(lr * groups[0][0]), {"lr": lr * groups[0][0], "held_nll": None, "tried": []}
        state = state_copy(self.model)

        def put_back() -> None:
            put_state(self.model, state)

        if fallback is not None:
            fallback()
        before = self.held_nlls()
        bar = float(before.mean())
        put_back()
        tried: list[tuple[float, float, float]] = []
        for group in groups:
            out, f, rise, se = self._best_rate(attempt, lr, group, before, put_back, tried)
            if rise <= GUARD_SE * se:
                return out, {"lr": lr * f, "held_nll": (bar, bar + rise), "tried": tried}
            put_back()
            log.info(
                "%s at lr %.3g raised the held-out NLL %.4f -> %.4f (+%.1f standard errors): undone",
                desc, lr * f, bar, bar + rise, rise / se if se else math.inf,
            )  # fmt: skip
        if fallback is not None:
            fallback()
        warnings.warn(
            f"{desc}: every learning rate in {[t[0] for t in tried]} raised the held-out NLL beyond noise "
            f"({bar:.4f} -> {[round(t[1], 4) for t in tried]}); the stage was undone (the model is as it was "
            "without it)",
            stacklevel=3,
        )
        return None, {"lr": None, "held_nll": (bar, bar), "tried": tried}

    def _best_rate(
        self,
        attempt: Callable[[float], T],
        lr: float,
        group: tuple[float, ...],
        before: torch.Tensor,
        put_back: Callable[[], None],
        tried: list[tuple[float, float, float]],
    ) -> tuple[T, float, float, float]:
        """Run ``attempt(lr * f)`` for each ``f`` of ``group`` from the model as it came (``put_back``);
        the model ends at the one with the lowest held-out NLL. Returns its result, factor and paired
        change (mean, standard error) against ``before``; every rate's ``(lr, nll, se)`` joins ``tried``."""
        best: tuple[T, float, float, float] | None = None
        best_state: dict[str, torch.Tensor] | None = None  # None while the model itself is the best so far
        best_passes = dict(self.passes)
        for j, f in enumerate(group):
            if j:
                best_state = state_copy(self.model) if best_state is None else best_state
                put_back()
            out = attempt(lr * f)
            rise, se = paired_change(before, self.held_nlls())
            tried.append((lr * f, float(before.mean()) + rise, se))
            if best is None or rise < best[2]:
                best, best_state, best_passes = (out, f, rise, se), None, dict(self.passes)
            elif best_state is not None:
                put_state(self.model, best_state)
        self.passes = best_passes  # the per-pass record of the attempt kept
        assert best is not None
        return best


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model``'s state (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def put_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`state_copy`'s tensors back into ``model``, in place."""
    current = model.state_dict(keep_vars=True)
    for k, v in state.items():
        current[k].data.copy_(v)


def paired_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Mean of ``after - before`` (per-token NLLs of one text) and its standard error, tokens taken as
    independent (neighbouring tokens are not, so this understates the noise)."""
    diff = (after - before).double()
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return float(diff.mean()), se


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything :func:`restore` needs to put ``model`` back: tensors, condify configs, modes, flags."""
    from .convert import applied_configs

    return {
        "state": state_copy(model),
        "configs": [c.to_dict() for c in applied_configs(model)],
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


@torch.no_grad()
def restore(model: nn.Module, snap: dict[str, Any]) -> None:
    """Put ``model`` back as :func:`snapshot` saw it (re-applying its condify structure if it changed)."""
    from . import registry
    from .convert import applied_configs, modify, unmodify

    if [c.to_dict() for c in applied_configs(model)] != snap["configs"]:
        if applied_configs(model):
            unmodify(model)
        for d in snap["configs"]:
            modify(model, registry.get(d["method"]).config_cls.from_dict(d), _from_checkpoint=True)
    put_state(model, snap["state"])
    for n, m in model.named_modules():
        m.training = snap["training"].get(n, m.training)
    for n, p in model.named_parameters():
        p.requires_grad_(snap["requires_grad"].get(n, p.requires_grad))
