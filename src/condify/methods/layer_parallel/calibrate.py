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
from ...convert import applied_configs, free_layers, modify, unmodify, update_config
from ...run import Run
from ...training import Batch, distill_loss, mean_nll, recovery_steps
from .config import LayerParallelConfig


@dataclasses.dataclass
class LayerParallelCalibration(Options):
    """Options of layer-parallel's ``calibrate``.

    Budget: ``pairs=N`` pairs; ``max_ppl_increase=x`` as many pairs as keep the sweep perplexity within
    ``(1 + x)·dense`` (training-free); neither keeps the config's ``pairs``. ``placement="any"`` (default)
    measures each candidate pair alone and takes the least sensitive disjoint pairs (greedy; they need
    not touch, so models that alternate attention types get pairs too); ``"contiguous"`` sweeps the
    start of one contiguous range (the paper's placement). ``starts`` limits the candidate first layers
    of a pair (``"any"``) or of the range (default: all that keep the first and last layer dense). The
    first ``sweep_batches`` fit batches score the sweep; all fit batches feed the fine-tune
    (``finetune_steps`` AdamW steps on the paired layers only, KL to the dense model when ``distill``
    else LM loss; default: :func:`condify.training.recovery_steps`, 1-4 passes over the fit batches sized
    to the data, ending at the pass that scored best on the hold-out; the step that wins the quality back
    on small models: x1.46 -> x1.10 at 4 pairs on SmolLM2, ``benchmarks/results/layer_parallel.md``).
    """

    owner = "layer-parallel calibrate"

    pairs: int | None = option(None, ge=1)
    max_ppl_increase: float | None = option(None, gt=0.0)
    placement: str = option("any", choices=("any", "contiguous"))
    starts: list[int] | None = None
    sweep_batches: int = option(2, ge=1)
    finetune_steps: int | None = option(None, ge=0)
    lr: float = option(1e-4, ge=0.0)
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


def _nll_with(model: nn.Module, cfg: LayerParallelConfig, layers: list[int], batches: list[Batch]) -> float:
    modify(model, dataclasses.replace(cfg, layers=sorted(layers), fuse=False))
    try:
        return mean_nll(model, batches)
    finally:
        unmodify(model, "layer-parallel")


def _choose_any(
    model: nn.Module, cfg: LayerParallelConfig, opts: LayerParallelCalibration, score: list[Batch], run: Run
) -> tuple[list[int], float, dict[str, Any]]:
    """Least sensitive disjoint pairs: (paired layers, sweep NLL, entries) on the model without layer-parallel.

    Each candidate pair is scored alone; then pairs are added greedily, each step trying the
    ``_SHORTLIST`` best remaining candidates together with the pairs already chosen (pairs interact).
    The best contiguous range of the same size is a rival: the lower sweep NLL wins.
    """
    n = len(get_adapter(model).layer_list(model))
    dense_nll = mean_nll(model, score)
    allowed = opts.starts if opts.starts is not None else range(1, n - 2)
    usable = set(free_layers(model, "layer-parallel"))  # layers another method converts are not candidates
    cands = [s for s in allowed if s >= 0 and s + 2 <= n and {s, s + 1} <= usable]
    cost = {
        s: _nll_with(model, cfg, [s, s + 1], score)
        for s in tqdm(cands, desc="pair sensitivity", disable=not run.progress, leave=False)
    }
    out: dict[str, Any] = {
        "sweep_dense_ppl": math.exp(dense_nll),
        "pair_ppl": {s: math.exp(v) for s, v in cost.items()},
    }
    budget = opts.max_ppl_increase
    want = opts.pairs or (cfg.pairs if budget is None else n // 2)
    chosen: list[int] = []
    nll = dense_nll
    while len(chosen) < 2 * want:
        free = sorted((s for s in cost if s not in chosen and s + 1 not in chosen), key=cost.__getitem__)
        if not free:
            break
        trials = {s: cost[s] if not chosen else _nll_with(model, cfg, [*chosen, s, s + 1], score)
                  for s in free[:_SHORTLIST]}  # fmt: skip
        s = min(trials, key=trials.__getitem__)
        if budget is not None and math.exp(trials[s] - dense_nll) > 1 + budget:
            break
        chosen, nll = [*chosen, s, s + 1], trials[s]
    if not chosen:
        best = min(cost.values()) if cost else math.inf
        raise ConfigError(
            f"layer-parallel: even one pair costs more than max_ppl_increase={budget} "
            f"(best: x{math.exp(best - dense_nll):.3f}); raise the budget"
        )
    if len(chosen) < 2 * want and budget is None:
        raise ConfigError(
            f"layer-parallel: only {len(chosen) // 2} disjoint pairs fit the candidates, asked for {want}"
        )
    p = len(chosen) // 2
    starts = [
        s
        for s in range(1, n - 2 * p)
        if (opts.starts is None or s in opts.starts) and set(range(s, s + 2 * p)) <= usable
    ]
    if p > 1 and starts:  # the contiguous rival
        start, v = _sweep(model, cfg, p, starts, score, run.progress)
        out["contiguous_ppl"] = math.exp(v)
        if v < nll:
            chosen, nll = list(range(start, start + 2 * p)), v
    return sorted(chosen), nll, out


_SHORTLIST = 4


def _choose(
    model: nn.Module, cfg: LayerParallelConfig, opts: LayerParallelCalibration, score: list[Batch], run: Run
) -> tuple[int, int | None, float, dict[str, Any]]:
    """One contiguous range: (pairs, start, sweep NLL, entries) on the model without layer-parallel."""
    n = len(get_adapter(model).layer_list(model))
    dense_nll = mean_nll(model, score)
    out: dict[str, Any] = {"sweep_dense_ppl": math.exp(dense_nll), "sweep": []}

    usable = set(free_layers(model, "layer-parallel"))

    def candidates(p: int) -> list[int]:
        allowed = opts.starts if opts.starts is not None else range(1, n - 2 * p)
        return [s for s in allowed if s >= 0 and s + 2 * p <= n and set(range(s, s + 2 * p)) <= usable]

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
    score = run.fit[: opts.sweep_batches]
    if opts.placement == "contiguous":
        p, start, nll, result = _choose(model, cfg, opts, score, run)
        final = dataclasses.replace(cfg, pairs=p, start=start, layers=None)
    else:
        layers, nll, result = _choose_any(model, cfg, opts, score, run)
        final = dataclasses.replace(cfg, layers=layers)
        p, start = len(layers) // 2, final.start
    modify(model, final)
    final = next(c for c in applied_configs(model) if c.method == "layer-parallel")
    n = len(get_adapter(model).layer_list(model))
    result.update(pairs=p, start=start, layers=final.resolve(n), ppl_training_free=math.exp(nll))
    steps = recovery_steps(run.fit) if opts.finetune_steps is None else opts.finetune_steps
    if steps:
        layers = get_adapter(model).layer_list(model)
        params = [prm for i in final.resolve(n) for prm in layers[i].parameters()]
        loss = distill_loss(run.teacher() if opts.distill else None)
        losses, kept = run.keep_if_better(
            lambda lr: run.train(params, steps, loss, lr=lr, desc="finetune pairs", best_pass=True),
            opts.lr,
            "layer-parallel finetune",
        )
        result.update(
            finetune_steps=steps, finetune_tokens=run.tokens, final_loss=losses[-1] if losses else None
        )
        result.update(finetune_lr=kept["lr"], finetune_tried=kept["tried"])
        result["finetune_passes"] = run.passes.get("finetune pairs")  # held-out NLL per pass, the pass kept
    update_config(model, final)
    return result
