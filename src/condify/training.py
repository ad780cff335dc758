"""The calibration toolkit every method's ``calibrate`` composes.

- data (in :mod:`condify.batches`): ``as_batches``, ``split_holdout``, ``real_tokens``;
- the dense teacher (:func:`frozen_teacher`), the losses (:func:`lm_loss`, :func:`kl_loss`,
  :func:`distill_loss`) and the schedule (:func:`cosine`);
- loops: :func:`train` (AdamW, progress, non-finite checks, parameters restored on failure) and
  :func:`fit_regression` (Adam + MSE of a small module on recorded activations); both step fp32
  copies of bf16 / fp16 parameters (:class:`Masters`);
- :func:`recovery_steps` / :func:`short_warmup` / :func:`scale_to_weights`: how recovery fine-tunes are sized.

One calibrate call's context and its transactions (:class:`condify.run.Run`) are in :mod:`condify.run`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .batches import Batch, cycle, real_tokens
from .config import ConfigError

log = logging.getLogger("condify")
LR_REFERENCE_RMS = 0.2  # rates are quoted for weight matrices of this RMS (SmolLM2-135M's: 0.17-0.20)
LR_SCALES = ("weights", "none")
RECOVERY_TOKENS = 32768  # recovery fine-tunes: at least this many tokens by default (recovery_steps) ...
RECOVERY_MAX_PASSES = 4  # ... in whole passes over the fit batches, at most this many

Loss = Callable[[nn.Module, Batch, int], torch.Tensor]
Groups = Sequence[nn.Parameter] | Sequence[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------
# teacher, losses, schedule
# ----------------------------------------------------------------------------------------------------------


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen dense copy of ``model`` (every condify method removed), in eval mode."""
    from .convert import applied_configs, unmodify

    teacher = copy.deepcopy(model)
    if applied_configs(teacher):
        unmodify(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross entropy, ignoring padded positions."""
    labels = batch["input_ids"][:, 1:]
    logits = logits[:, :-1]
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )


KL_CHUNK_ELEMENTS = 1 << 25  # logits entries per chunk of kl_loss (128 MB in fp32) ...
KL_CHUNK_ABOVE = 1 << 27  # ... when the logits have more entries than this (512 MB in fp32)


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    s = F.log_softmax(student.float() / t, -1)
    p = F.log_softmax(teacher.float() / t, -1)
    return (p.exp() * (p - s)).sum(-1)


def kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, batch: Batch, temperature: float = 1.0
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on logits, ignoring padded positions.

    Logits of more than ``KL_CHUNK_ABOVE`` entries (a large vocabulary: Gemma-3's 262k x 1024 tokens) are
    taken in chunks of positions, each recomputed in the backward (activation checkpointing), so their
    fp32 softmax intermediates never exist for the whole batch at once (measured on 512 positions of a
    262k vocabulary: 2.5 -> 1.2 GB on top of the logits, for about twice the time of this loss)."""
    t = temperature
    rows_s, rows_t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    step = max(1, KL_CHUNK_ELEMENTS // student.shape[-1])
    if student.numel() <= KL_CHUNK_ABOVE or rows_s.shape[0] <= step:
        kl = _kl_rows(rows_s, rows_t, t)
    else:
        grad = torch.is_grad_enabled() and student.requires_grad
        parts = [
            checkpoint(_kl_rows, a, b, t, use_reentrant=False) if grad else _kl_rows(a, b, t)
            for a, b in zip(rows_s.split(step), rows_t.split(step), strict=True)
        ]
        kl = torch.cat(parts)
    kl = kl.reshape(student.shape[:-1])
    if "attention_mask" in batch:
        m = batch["attention_mask"].to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1) * t * t
    return kl.mean() * t * t


def distill_loss(
    teacher: nn.Module | None, *, lm_weight: float = 0.0, extra: Callable[[], torch.Tensor] | None = None
) -> Loss:
    """KL to ``teacher``'s logits (next-token cross entropy when ``teacher`` is None), plus
    ``lm_weight`` x cross entropy and ``extra()`` (e.g. a sparsity penalty recorded during the forward)."""

    def loss_fn(model: nn.Module, b: Batch, step: int) -> torch.Tensor:
        logits = model(**b, use_cache=False).logits
        if teacher is None:
            loss = lm_loss(logits, b)
        else:
            with torch.no_grad():
                t = teacher(**b, use_cache=False).logits
            loss = kl_loss(logits, t, b)
            if lm_weight:
                loss = loss + lm_weight * lm_loss(logits, b)
        return loss if extra is None else loss + extra()

    return loss_fn


def cosine(steps: int, warmup: int = 0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return f


# ----------------------------------------------------------------------------------------------------------
# loops
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Temporarily freeze everything but ``params``; restores requires_grad and train/eval mode."""
    params = list(params)
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.train()
        yield params
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
        model.train(was_training)


def _groups(params: Groups, lr: float) -> list[dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**g, "params": list(g["params"]), "lr": g.get("lr", lr)} for g in params]
    return [{"params": params, "lr": lr}]


class Masters:
    """fp32 master copies of the low-precision (bf16 / fp16) parameters among ``params``: the optimiser
    steps the copies and each step's result is written back, rounded, to the model's parameter. Adam's
    updates are ~lr per step, below bf16's resolution for small weights (a 0.03 weight moves in steps of
    2.4e-4): without the copies most updates round away (a tiny llama in bf16, weights of RMS 0.02,
    20 AdamW steps at lr 3e-5: 27 % of the MLP weights changed at all). fp32 parameters are used as
    they are."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        low = (torch.bfloat16, torch.float16)
        self.pairs = [(p, p.detach().float()) for p in params if p.dtype in low]
        self._of = {id(p): m for p, m in self.pairs}

    def swap(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` with each low-precision parameter replaced by its master."""
        return [{**g, "params": [self._of.get(id(p), p) for p in g["params"]]} for g in groups]

    def grads_in(self) -> None:
        """Move each low-precision gradient to its master, in fp32 (after ``backward``)."""
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the masters into the model's parameters (after ``optimizer.step``)."""
        for p, m in self.pairs:
            p.copy_(m)


def added_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter in a child condify added (routers, layouts): new, not the model's own."""
    ids: set[int] = set()
    for m in model.modules():
        patch = getattr(m, "_condify_patch", None)
        for name in patch.children if patch is not None else ():
            ids.update(id(q) for q in m.get_submodule(name).parameters())
    return ids


def scale_to_weights(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with every weight matrix of the model's own (not one condify added) in a group of its
    own, at its group's rate x its RMS / ``LR_REFERENCE_RMS``; vectors (norms, biases) and added
    parameters keep their group's rate.

    Adam moves each entry by about the rate per step whatever the weight's size, so a rate that suits
    one model is a larger relative change on a model with smaller weights: Gemma-3-270M's matrices have
    RMS 0.02-0.04, a fifth to a tenth of SmolLM2-135M's, and one step of dynamic-k's routed fine-tune
    at 3e-4 took the batch KL 0.34 -> 2.9 there. Scaled, each step changes every matrix by the same
    fraction of its size on both."""
    new = added_parameters(model)
    out: list[dict[str, Any]] = []
    for g in groups:
        own = [p for p in g["params"] if p.dim() >= 2 and id(p) not in new]
        rest = [p for p in g["params"] if p.dim() < 2 or id(p) in new]
        if rest:
            out.append({**g, "params": rest})
        for p in own:
            rms = float(torch.linalg.vector_norm(p.detach())) / math.sqrt(p.numel())
            out.append({**g, "params": [p], "lr": g["lr"] * (rms / LR_REFERENCE_RMS if rms > 0 else 1.0)})
    return out


def recovery_steps(
    batches: list[Batch], tokens: int = RECOVERY_TOKENS, max_passes: int = RECOVERY_MAX_PASSES
) -> int:
    """Default length of a recovery fine-tune on ``batches``, one batch per step: whole passes, enough for
    ``tokens`` tokens (default ``RECOVERY_TOKENS``), at least one and at most ``max_passes``.

    Measured on dynamic-k's routed fine-tune at a 50 % target (held-out test ratio at 1 / 2 / 4 passes):
    SmolLM2 + shakespeare, 7k tokens a pass, x1.372 / x1.291 / x1.238; Gemma-3-270M + python-docs, 2.8k
    tokens a pass, x1.499 / x1.534 / x1.487 (``benchmarks/results/recovery_passes.md``). Data of 32k tokens
    or more gets one pass, as before."""
    per_pass = real_tokens(batches)
    if not batches or per_pass == 0:
        return len(batches)
    return len(batches) * min(max_passes, max(1, math.ceil(tokens / per_pass)))


def short_warmup(steps: int) -> int:
    """Warm-up steps for a short fine-tune: a quarter of ``steps`` (at most 50). Adam's first steps move
    every entry by about the full rate whatever its gradient, and a one-pass recovery fine-tune has
    10-20 steps, where a tenth of them is no warm-up at all."""
    return min(50, math.ceil(steps / 4))


def train(
    model: nn.Module,
    params: Groups,
    batches: list[Batch],
    steps: int,
    loss_fn: Loss,
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    max_grad_norm: float = 1.0,
    lr_scale: str = "none",
    after_step: Callable[[int, float], str | None] | None = None,
    stop: Callable[[], bool] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """AdamW on ``params`` only (a list, or param groups with their own ``lr``), cosine schedule,
    ``steps`` steps cycling over ``batches``; returns the losses.

    ``lr_scale="weights"``: each of the model's own weight matrices trains at the rate x its RMS / 0.2
    (:func:`scale_to_weights`); ``"none"``: the rates as given.

    ``warmup`` defaults to a tenth of the steps (at most 10; :func:`short_warmup` for one-pass
    fine-tunes). ``after_step(step, loss)`` runs after each optimiser step and may return a short
    status for the progress bar; ``stop()``, checked after it, ends the training there when True (the
    parameters stay as trained). A non-finite loss raises
    :class:`FloatingPointError`; on any error the trained parameters get their values back.
    """
    if lr_scale not in LR_SCALES:
        raise ConfigError(f"{desc}: lr_scale must be one of {LR_SCALES}, got {lr_scale!r}")
    losses: list[float] = []
    if steps <= 0:
        return losses
    groups = _groups(params, lr)
    if lr_scale == "weights":
        groups = scale_to_weights(model, groups)
    for g in groups:
        if not math.isfinite(g["lr"]) or g["lr"] < 0:
            raise ConfigError(f"{desc}: learning rate must be a finite number >= 0, got {g['lr']!r}")
    flat = [p for g in groups for p in g["params"]]
    saved = [p.detach().clone() for p in flat]
    warmup = min(10, steps // 10) if warmup is None else warmup
    masters = Masters(flat)
    groups = masters.swap(groups)
    stepped = [p for g in groups for p in g["params"]]
    try:
        with only_trainable(model, flat):
            opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, warmup))
            it = cycle(batches)
            bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
            for step in bar:
                loss = loss_fn(model, next(it), step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                masters.grads_in()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(stepped, max_grad_norm)
                opt.step()
                masters.write_back()
                sched.step()
                losses.append(loss.item())
                status = after_step(step, losses[-1]) if after_step is not None else None
                bar.set_postfix_str(f"loss={losses[-1]:.3f}" + (f" {status}" if status else ""))
                if stop is not None and stop():
                    break
    except BaseException:
        with torch.no_grad():
            for p, v in zip(flat, saved, strict=True):
                p.copy_(v)
        raise
    return losses


def fit_regression(
    params: list[nn.Parameter],
    loss: Callable[[torch.Tensor], torch.Tensor],
    num_rows: int,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> None:
    """Adam + cosine on ``loss(rows)`` for random minibatches of row indices in ``[0, num_rows)``
    (a small module regressing recorded activations: routers, distilled projections)."""
    gen = torch.Generator().manual_seed(seed)
    saved = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(True)
    masters = Masters(params)
    opt = torch.optim.Adam(masters.swap([{"params": params}])[0]["params"], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                rows = torch.randint(0, num_rows, (min(batch_size, num_rows),), generator=gen)
                value = loss(rows)
                opt.zero_grad(set_to_none=True)
                value.backward()
                masters.grads_in()
                opt.step()
                masters.write_back()
                sched.step()
    finally:
        for q, r in zip(params, saved, strict=True):
            q.requires_grad_(r)


@torch.no_grad()
def mean_nll(model: nn.Module, batches: list[Batch]) -> float:
    """Mean next-token NLL over the scored targets of ``batches`` (``log`` of :func:`condify.evaluate.perplexity`)."""
    from .evaluate import perplexity

    return math.log(perplexity(model, batches, progress=False))
