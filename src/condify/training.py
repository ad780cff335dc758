"""The calibration toolkit every method's ``calibrate`` composes.

- data: :func:`as_batches` (normalise what the user passes), :func:`split_holdout` (one hold-out
  contract for every method: reported numbers are always on batches nothing trained on);
- the dense teacher (:func:`frozen_teacher`), the losses (:func:`lm_loss`, :func:`kl_loss`,
  :func:`distill_loss`) and the schedule (:func:`cosine`);
- loops: :func:`train` (AdamW, progress, non-finite checks, parameters restored on failure) and
  :func:`fit_regression` (Adam + MSE of a small module on recorded activations);
- :class:`Run`: one calibrate call's context (fit / held-out batches, teacher, token count, progress);
- :func:`snapshot` / :func:`restore`: what makes ``condify.calibrate`` transactional.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError

log = logging.getLogger("condify")

Batch = dict[str, torch.Tensor]
Loss = Callable[[nn.Module, Batch, int], torch.Tensor]
Groups = Sequence[nn.Parameter] | Sequence[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Calibration data is unusable (wrong type, dtype, shape, ids out of range, bad mask, all padding);
    raised before the model is touched."""


_MAX_REPORT = 5


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (the valid token ids are ``0..vocab_size - 1``)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return getattr(getattr(model, "config", None), "vocab_size", None)


def as_batches(
    data: Iterable[Any] | torch.Tensor,
    device: torch.device | None = None,
    vocab_size: int | None = None,
    *,
    what: str = "calibration data",
) -> list[Batch]:
    """Normalise calibration data to a list of ``{"input_ids", "attention_mask"?}`` dicts, validated.

    Accepts a (b, t) or (t,) tensor, an iterable of such tensors, or of dicts with ``input_ids`` (and
    optionally ``attention_mask``). Raises :class:`DataError` unless every batch has integer ids of
    shape (b, t) with b, t >= 1 (in ``[0, vocab_size)`` when given), a mask of the same shape with 0/1
    values and at least one real token, and the data has at least one next-token target.
    """
    if data is None or isinstance(data, (str, bytes, dict)):
        raise DataError(
            f"{what}: expected a tensor of input_ids or an iterable of tensors / dicts with 'input_ids', "
            f"got {type(data).__name__}"
        )
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise DataError(f"{what}: expected a (batch, tokens) tensor of input_ids, got a scalar")
        data = [data] if data.dim() <= 2 else list(data)
    try:
        items = list(data)
    except TypeError:
        raise DataError(
            f"{what}: expected a tensor of input_ids or an iterable of batches, got {type(data).__name__}"
        ) from None
    out = [_batch(item, i, vocab_size, what) for i, item in enumerate(items)]
    if not out:
        raise DataError(f"{what} is empty; pass at least one batch of input_ids")
    if not any(_targets(b) for b in out):
        raise DataError(
            f"{what}: no next-token targets (every sequence has fewer than 2 real tokens); pass "
            f"sequences of at least 2 non-padding tokens"
        )
    return [{k: v.to(device) if device is not None else v for k, v in b.items()} for b in out]


def _targets(b: Batch) -> int:
    """Next-token targets of a batch (pairs of consecutive real tokens)."""
    if "attention_mask" not in b:
        return b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1)
    m = b["attention_mask"].bool()
    return int((m[:, 1:] & m[:, :-1]).sum())


def _batch(item: Any, i: int, vocab: int | None, what: str) -> Batch:
    where = f"{what}: batch {i}"
    if isinstance(item, torch.Tensor):
        item = {"input_ids": item}
    if not isinstance(item, dict) or "input_ids" not in item:
        raise DataError(
            f"{where}: expected a tensor of input_ids or a dict with 'input_ids', got {type(item).__name__}"
            + (f" with keys {sorted(map(str, item))}" if isinstance(item, dict) else "")
        )
    b = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask") and v is not None}
    for k, v in b.items():
        if not isinstance(v, torch.Tensor):
            raise DataError(f"{where}: `{k}` must be a torch tensor, got {type(v).__name__}")
    ids = b["input_ids"]
    if ids.dtype not in (torch.int32, torch.int64):
        raise DataError(f"{where}: input_ids must be integer token ids (int64 or int32), got {ids.dtype}")
    if ids.dim() == 1:
        b = {k: v.unsqueeze(0) if v.dim() == 1 else v for k, v in b.items()}
        ids = b["input_ids"]
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(
            f"{where}: input_ids must have shape (batch, tokens) with batch and tokens >= 1, got "
            f"{tuple(ids.shape)}"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        allowed = f"[0, {vocab})" if vocab is not None else ">= 0"
        raise DataError(
            f"{where}: token id {bad} is out of range; ids must be in {allowed} (the model's vocabulary "
            f"size is {vocab}); was the data tokenized with another tokenizer?"
        )
    mask = b.get("attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(ids.shape):
            raise DataError(
                f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; "
                f"they must be the same"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise DataError(
                f"{where}: attention_mask must be an integer or bool tensor of 0/1, got {mask.dtype}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            vals = sorted({int(v) for v in mask.unique()[:10]})
            raise DataError(f"{where}: attention_mask must hold only 0 and 1, got values {vals}")
        if not bool(mask.any()):
            raise DataError(f"{where}: attention_mask is all zeros (only padding); drop the batch")
        if mask.dtype == torch.bool:
            b["attention_mask"] = mask.long()
    return b


def split_holdout(
    batches: list[Batch], holdout: int | Iterable[Any] | None, vocab_size: int | None = None
) -> tuple[list[Batch], list[Batch]]:
    """(fit, held-out) batches, the one hold-out contract of every method.

    ``holdout``: an int ``n`` holds out the last ``n`` batches (0: none); batches (anything
    :func:`as_batches` takes) are held out as given and all of ``batches`` is fit data; ``None`` (the
    default) holds out the last 10 % of the batches, at least one when there are two or more.
    ``vocab_size`` bounds the ids of given hold-out batches (validated like :func:`as_batches`).
    """
    if not batches:
        raise DataError("calibration data is empty; pass at least one batch of input_ids")
    if holdout is None:
        holdout = max(1, round(0.1 * len(batches))) if len(batches) >= 2 else 0
    if isinstance(holdout, (bool, float)):
        raise ConfigError(
            f"calibrate: `holdout` must be a number of batches (int), batches, or None, got {holdout!r}"
        )
    if not isinstance(holdout, int):
        device = batches[0]["input_ids"].device
        return batches, as_batches(holdout, device, vocab_size, what="calibrate: `holdout`")
    if not 0 <= holdout < len(batches):
        raise ConfigError(
            f"calibrate: `holdout={holdout}` must be in [0, {len(batches) - 1}] for {len(batches)} "
            f"batch(es); pass more batches or a smaller hold-out"
        )
    fit, held = (batches[:-holdout], batches[-holdout:]) if holdout else (batches, [])
    for name, part in (("fit", fit), ("held-out", held)):
        if part and not any(_targets(b) for b in part):
            raise DataError(
                f"calibrate: the {len(part)} {name} batch(es) (`holdout={holdout}`) have no next-token "
                f"target (all padding or 1-token sequences); pass more data or another hold-out"
            )
    return fit, held


def real_tokens(batches: Iterable[Batch]) -> int:
    """Non-padding tokens in ``batches``."""
    return sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
    )


def cycle(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches


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


def kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, batch: Batch, temperature: float = 1.0
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on logits, ignoring padded positions."""
    t = temperature
    s = F.log_softmax(student.float() / t, -1)
    p = F.log_softmax(teacher.float() / t, -1)
    kl = (p.exp() * (p - s)).sum(-1)
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
    after_step: Callable[[int, float], str | None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """AdamW on ``params`` only (a list, or param groups with their own ``lr``), cosine schedule,
    ``steps`` steps cycling over ``batches``; returns the losses.

    ``warmup`` defaults to a tenth of the steps (at most 10). ``after_step(step, loss)`` runs after
    each optimiser step and may return a short status for the progress bar. A non-finite loss raises
    :class:`FloatingPointError`; on any error the trained parameters get their values back.
    """
    losses: list[float] = []
    if steps <= 0:
        return losses
    groups = _groups(params, lr)
    for g in groups:
        if not math.isfinite(g["lr"]) or g["lr"] < 0:
            raise ConfigError(f"{desc}: learning rate must be a finite number >= 0, got {g['lr']!r}")
    flat = [p for g in groups for p in g["params"]]
    saved = [p.detach().clone() for p in flat]
    warmup = min(10, steps // 10) if warmup is None else warmup
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
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(flat, max_grad_norm)
                opt.step()
                sched.step()
                losses.append(loss.item())
                status = after_step(step, losses[-1]) if after_step is not None else None
                bar.set_postfix_str(f"loss={losses[-1]:.3f}" + (f" {status}" if status else ""))
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
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                rows = torch.randint(0, num_rows, (min(batch_size, num_rows),), generator=gen)
                value = loss(rows)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
    finally:
        for q, r in zip(params, saved, strict=True):
            q.requires_grad_(r)


@torch.no_grad()
def mean_nll(model: nn.Module, batches: list[Batch]) -> float:
    """Mean next-token NLL over the scored targets of ``batches`` (``log`` of :func:`condify.evaluate.perplexity`)."""
    from .evaluate import perplexity

    return math.log(perplexity(model, batches, progress=False))


# ----------------------------------------------------------------------------------------------------------
# one calibrate call
# ----------------------------------------------------------------------------------------------------------


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
    tokens: int = 0
    eval_mode: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    _teacher: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Refuse what cannot calibrate, before anything changes: ids outside the model's vocabulary
        (e.g. batches built by hand) and non-finite weights (training would only spread the NaN)."""
        from .convert import check_finite_weights

        vocab = vocab_size(self.model)
        for name, part in (("calibration data", self.fit), ("calibrate: `holdout`", self.held)):
            for i, b in enumerate(part):
                _batch(b, i, vocab, name)
        check_finite_weights(self.model, "calibrate")

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = frozen_teacher(self.model)
        return self._teacher

    def drop_teacher(self) -> None:
        """Free the dense copy (e.g. before a memory-hungry measurement)."""
        self._teacher = None

    def train(
        self, params: Groups, steps: int, loss_fn: Loss, *, batches: list[Batch] | None = None, **kwargs: Any
    ) -> list[float]:
        """:func:`train` on ``self.fit`` (or ``batches``), counting the tokens it uses."""
        batches = self.fit if batches is None else batches
        if steps > len(batches):
            log.info("%s: %d steps = %.1f passes over %d batches", kwargs.get("desc", "train"), steps,
                     steps / len(batches), len(batches))  # fmt: skip
        losses = train(self.model, params, batches, steps, loss_fn, progress=self.progress, **kwargs)
        self.tokens += sum(real_tokens([batches[i % len(batches)]]) for i in range(len(losses)))
        return losses


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything :func:`restore` needs to put ``model`` back: tensors, condify configs, modes, flags."""
    from .convert import applied_configs

    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
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
    current = model.state_dict(keep_vars=True)
    for k, v in snap["state"].items():
        current[k].data.copy_(v)
    for n, m in model.named_modules():
        m.training = snap["training"].get(n, m.training)
    for n, p in model.named_parameters():
        p.requires_grad_(snap["requires_grad"].get(n, p.requires_grad))
