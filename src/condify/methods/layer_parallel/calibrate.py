"""Data-dependent step of layer-parallel: choose the paired range by a perplexity sweep, then
optionally fine-tune the paired layers only (distilling from the dense model)."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...adapters import Adapter
from ...config import ConfigError, in_range
from ...convert import modify, unmodify
from ...training import Batch, kl_loss, lm_loss, mean_nll, train
from .config import LayerParallelConfig


def _sweep(
    model: nn.Module,
    cfg: LayerParallelConfig,
    pairs: int,
    starts: list[int],
    batches: list[Batch],
    progress: bool,
) -> tuple[int, float]:
    best = (starts[0], math.inf)
    for s in tqdm(starts, desc=f"sweep {pairs} pairs", disable=not progress, leave=False):
        trial = dataclasses.replace(cfg, pairs=pairs, start=s, fuse=False)
        try:
            modify(model, trial)
        except ConfigError:  # e.g. a pair mixing sliding and full attention
            continue
        nll = mean_nll(model, batches)
        unmodify(model, "layer-parallel")
        if nll < best[1]:
            best = (s, nll)
    return best


def calibrate(
    model: nn.Module,
    adapter: Adapter,
    cfg: LayerParallelConfig,
    batches: list[Batch],
    *,
    pairs: int | None = None,
    max_ppl_increase: float | None = None,
    starts: list[int] | None = None,
    sweep_batches: int = 2,
    finetune_steps: int = 0,
    lr: float = 5e-5,
    distill: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Pick the pair range, then fine-tune. Returns the sweep and training measurements.

    Budget: ``pairs=N`` picks the best start for N pairs; ``max_ppl_increase=x`` picks the largest N
    whose best range keeps sweep perplexity within ``(1 + x)·dense`` (training-free); neither keeps
    ``cfg.pairs`` and sweeps its start. ``starts`` limits the candidate start layers (default: all that
    keep the first and last layer dense). The first ``sweep_batches`` batches score the sweep; all
    batches feed the fine-tune (``finetune_steps`` AdamW steps on the paired layers only, KL to the
    dense model when ``distill`` else LM loss).
    """
    if pairs is not None and max_ppl_increase is not None:
        raise ConfigError("layer-parallel calibrate: give `pairs` or `max_ppl_increase`, not both")
    if max_ppl_increase is not None:
        in_range("max_ppl_increase", max_ppl_increase, 0.0, math.inf, lo_open=True)
    if sweep_batches < 1 or finetune_steps < 0:
        raise ConfigError("layer-parallel calibrate: `sweep_batches` must be >= 1 and `finetune_steps` >= 0")
    n = len(adapter.layer_list(model))
    score = batches[:sweep_batches]
    unmodify(model, "layer-parallel")
    dense_nll = mean_nll(model, score)
    result: dict[str, Any] = {"dense_ppl": math.exp(dense_nll), "sweep": []}

    def candidates(p: int) -> list[int]:
        allowed = starts if starts is not None else range(1, n - 2 * p)
        return [s for s in allowed if s >= 0 and s + 2 * p <= n]

    try:
        if max_ppl_increase is None:
            p = pairs or cfg.pairs
            if not candidates(p):
                raise ConfigError(f"layer-parallel: no start layer fits {p} pairs in {n} layers")
            start, nll = _sweep(model, cfg, p, candidates(p), score, progress)
            result["sweep"].append({"pairs": p, "start": start, "ppl": math.exp(nll)})
        else:
            p, start, nll = 0, None, dense_nll
            for q in range(1, n // 2):
                if not candidates(q):
                    break
                s, v = _sweep(model, cfg, q, candidates(q), score, progress)
                result["sweep"].append({"pairs": q, "start": s, "ppl": math.exp(v)})
                if math.exp(v - dense_nll) > 1 + max_ppl_increase:
                    break
                p, start, nll = q, s, v
            if p == 0:
                raise ConfigError(
                    f"layer-parallel: even one pair costs more than max_ppl_increase={max_ppl_increase} "
                    f"(best: x{result['sweep'][0]['ppl'] / result['dense_ppl']:.3f}); raise the budget"
                )
    except BaseException:
        modify(model, cfg)  # leave the model as it came in
        raise
    final = dataclasses.replace(cfg, pairs=p, start=start)
    teacher = copy.deepcopy(model).eval() if finetune_steps and distill else None
    modify(model, final)
    result.update(pairs=p, start=start, layers=final.resolve(n), ppl_training_free=math.exp(nll))
    if finetune_steps:
        layers = adapter.layer_list(model)
        params = [prm for i in final.resolve(n) for prm in layers[i].parameters()]

        def loss_fn(m: nn.Module, b: Batch, step: int):
            logits = m(**b, use_cache=False).logits
            if teacher is None:
                return lm_loss(logits, b)
            with torch.no_grad():
                t = teacher(**b, use_cache=False).logits
            return kl_loss(logits, t, b)

        losses = train(
            model,
            params,
            batches,
            finetune_steps,
            loss_fn,
            lr=lr,
            warmup=min(10, finetune_steps // 10),
            desc="finetune pairs",
            progress=progress,
        )
        tokens = sum(batches[i % len(batches)]["input_ids"].numel() for i in range(finetune_steps))
        result.update(finetune_steps=finetune_steps, finetune_tokens=tokens, final_loss=losses[-1])
        result["ppl_after_finetune"] = math.exp(mean_nll(model, score))
    return result
