"""Data-dependent step of layer-parallel: choose the paired range by a perplexity sweep, then
optionally fine-tune the paired layers only (distilling from the dense model)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ...adapters import get_adapter
from ...config import ConfigError, Options, option
from ...convert import applied_configs, modify, unmodify, update_config
from ...training import Batch, Run, distill_loss, mean_nll
from .config import LayerParallelConfig


@dataclasses.dataclass
class LayerParallelCalibration(Options):
    """Options of layer-parallel's ``calibrate``.

    Budget: ``pairs=N`` picks the best start for N pairs; ``max_ppl_increase=x`` picks the largest N
    whose best range keeps sweep perplexity within ``(1 + x)·dense`` (training-free); neither keeps the
    config's ``pairs`` and sweeps its start. ``starts`` limits the candidate start layers (default: all
    that keep the first and last layer dense). The first ``sweep_batches`` fit batches score the sweep;
    all fit batches feed the fine-tune (``finetune_steps`` AdamW steps on the paired layers only, KL to
    the dense model when ``distill`` else LM loss).
    """

    owner = "layer-parallel calibrate"

    pairs: int | None = option(None, ge=1)
    max_ppl_increase: float | None = option(None, gt=0.0)
    starts: list[int] | None = None
    sweep_batches: int = option(2, ge=1)
    finetune_steps: int = option(0, ge=0)
    lr: float = option(5e-5, ge=0.0)
    distill: bool = True

    def validate(self) -> None:
        if self.pairs is not None and self.max_ppl_increase is not None:
            raise ConfigError(f"{self.owner}: give `pairs` or `max_ppl_increase`, not both")


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


def _choose(
    model: nn.Module, cfg: LayerParallelConfig, opts: LayerParallelCalibration, score: list[Batch], run: Run
) -> tuple[int, int | None, float, dict[str, Any]]:
    """(pairs, start, sweep NLL, entries) on the model without layer-parallel."""
    n = len(get_adapter(model).layer_list(model))
    dense_nll = mean_nll(model, score)
    out: dict[str, Any] = {"sweep_dense_ppl": math.exp(dense_nll), "sweep": []}

    def candidates(p: int) -> list[int]:
        allowed = opts.starts if opts.starts is not None else range(1, n - 2 * p)
        return [s for s in allowed if s >= 0 and s + 2 * p <= n]

    if opts.max_ppl_increase is None:
        p = opts.pairs or cfg.pairs
        if not candidates(p):
            raise ConfigError(f"layer-parallel: no start layer fits {p} pairs in {n} layers")
        start, nll = _sweep(model, cfg, p, candidates(p), score, run.progress)
        out["sweep"].append({"pairs": p, "start": start, "ppl": math.exp(nll)})
        return p, start, nll, out
    p, start, nll = 0, None, dense_nll
    for q in range(1, n // 2):
        if not candidates(q):
            break
        s, v = _sweep(model, cfg, q, candidates(q), score, run.progress)
        out["sweep"].append({"pairs": q, "start": s, "ppl": math.exp(v)})
        if math.exp(v - dense_nll) > 1 + opts.max_ppl_increase:
            break
        p, start, nll = q, s, v
    if p == 0:
        raise ConfigError(
            f"layer-parallel: even one pair costs more than max_ppl_increase={opts.max_ppl_increase} "
            f"(best: x{out['sweep'][0]['ppl'] / out['sweep_dense_ppl']:.3f}); raise the budget"
        )
    return p, start, nll, out


def calibrate(model: nn.Module, run: Run, opts: LayerParallelCalibration) -> dict[str, Any]:
    """Pick the pair range on the fit batches, then fine-tune the paired layers (see the options)."""
    cfg = next(c for c in applied_configs(model) if c.method == "layer-parallel")
    unmodify(model, "layer-parallel")
    p, start, nll, result = _choose(model, cfg, opts, run.fit[: opts.sweep_batches], run)
    final = dataclasses.replace(cfg, pairs=p, start=start)
    modify(model, final)
    final = next(c for c in applied_configs(model) if c.method == "layer-parallel")
    n = len(get_adapter(model).layer_list(model))
    result.update(pairs=p, start=start, layers=final.resolve(n), ppl_training_free=math.exp(nll))
    if opts.finetune_steps:
        layers = get_adapter(model).layer_list(model)
        params = [prm for i in final.resolve(n) for prm in layers[i].parameters()]
        losses = run.train(
            params, opts.finetune_steps, distill_loss(run.teacher() if opts.distill else None),
            lr=opts.lr, desc="finetune pairs",
        )  # fmt: skip
        result.update(finetune_steps=opts.finetune_steps, finetune_tokens=run.tokens, final_loss=losses[-1])
    update_config(model, final)
    return result
