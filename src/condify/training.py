"""Shared pieces of every method's ``calibrate``: batch normalisation, losses and a small train loop."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Batch = dict[str, torch.Tensor]


def as_batches(data: Iterable[Any] | torch.Tensor, device: torch.device | None = None) -> list[Batch]:
    """Normalise calibration data to a list of ``{"input_ids", "attention_mask"?}`` dicts.

    Accepts a (b, t) or (t,) tensor, an iterable of such tensors, or of dicts with ``input_ids``.
    """
    if isinstance(data, torch.Tensor):
        data = [data] if data.dim() <= 2 else list(data)
    out = []
    for i, item in enumerate(data):
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        if not isinstance(item, dict) or "input_ids" not in item:
            raise TypeError(
                f"calibration batch {i}: expected a tensor of input_ids or a dict with 'input_ids'"
            )
        b = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask") and v is not None}
        if b["input_ids"].dim() == 1:
            b = {k: v.unsqueeze(0) for k, v in b.items()}
        if b["input_ids"].dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"calibration batch {i}: input_ids must be integer token ids, got {b['input_ids'].dtype}"
            )
        out.append({k: v.to(device) if device is not None else v for k, v in b.items()})
    if not out:
        raise ValueError("calibration data is empty; pass at least one batch of input_ids")
    return out


def cycle(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches


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


def train(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    batches: list[Batch],
    steps: int,
    loss_fn: Callable[[nn.Module, Batch, int], torch.Tensor],
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: int = 0,
    max_grad_norm: float = 1.0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """AdamW on ``params`` only, cosine schedule, ``steps`` steps cycling over ``batches``; returns losses."""
    losses: list[float] = []
    if steps <= 0:
        return losses
    with only_trainable(model, params) as ps:
        opt = torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
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
                torch.nn.utils.clip_grad_norm_(ps, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def mean_nll(model: nn.Module, batches: list[Batch]) -> float:
    """Token-weighted mean next-token NLL (for quick sweeps inside calibrate)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        logits = model(**b, use_cache=False).logits
        n = (
            int((b["attention_mask"][:, 1:] != 0).sum())
            if "attention_mask" in b
            else b["input_ids"][:, 1:].numel()
        )
        total += lm_loss(logits, b).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)
