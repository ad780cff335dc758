"""condify: turn dense Hugging Face LLMs into conditional-compute models.

model = condify.modify(model, method="layer-parallel", pairs=2)
condify.calibrate(model, batches)
condify.save_pretrained(model, "out/"); model = condify.from_pretrained("out/")
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from . import registry
from .adapters import UnsupportedModelError
from .batches import DataError, text_batches
from .config import ConfigError, MethodConfig
from .convert import ModifyError, applied_configs, describe, modify, unmodify
from .integrations import training_loss
from .registry import list_methods
from .serialization import CheckpointError, from_pretrained, save_pretrained
from .tracking import track

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MethodConfig",
    "ModifyError",
    "QualityWarning",
    "UnsupportedModelError",
    "applied_configs",
    "calibrate",
    "describe",
    "from_pretrained",
    "list_methods",
    "modify",
    "save_pretrained",
    "text_batches",
    "track",
    "training_loss",
    "unmodify",
]

WARN_RATIO = 1.5  # calibrate warns when held-out perplexity exceeds this multiple of dense
WARN_SE = 2.0  # ... or when the ratio's upper bound (this many paired standard errors) does

log = logging.getLogger("condify")


class QualityWarning(UserWarning):
    """A calibrated model is much worse than dense on the held-out batches."""


def calibrate(
    model: nn.Module,
    data: Any,
    *,
    method: str | None = None,
    holdout: int | Any | None = None,
    keep_if_better: bool = True,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run the data-dependent step of the applied method(s) on ``data``; returns the measurements.

    ``data``: an iterable of ``input_ids`` tensors or of dicts with ``input_ids``/``attention_mask``.
    With several methods applied, name one with ``method=``; ``options`` are that method's calibrate
    options (validated before anything changes). ``holdout``: batches that are never trained on (see
    :func:`condify.batches.split_holdout`; default: the last 10 % of ``data``, at least one batch of
    two or more).

    ``keep_if_better`` (default): a recovery fine-tune (dynamic-k's routed fine-tune, lte's hard stage,
    layer-parallel's paired-layer fine-tune, mod-threshold's training) that raises the held-out NLL
    beyond noise (one paired standard error) is undone and tried once more at a tenth of its rate
    (:meth:`condify.run.Run.keep_if_better`); ``False`` keeps it as trained.

    The result always has ``dense_ppl`` and ``ppl`` (held-out perplexity before and after, None without
    a hold-out), ``ratio``, ``ratio_high`` (its upper bound: ``WARN_SE`` paired standard errors of the
    per-token NLL change above it), ``executed`` (fraction of the method's compute that ran on the
    held-out batches; None where nothing is skipped per token), ``tokens`` (trained on), ``seconds``, and
    the method's own entries. The ratio is logged; a :class:`QualityWarning` is raised when it or
    ``ratio_high`` is above 1.5 (a small hold-out does not hide a broken model). On any error the model
    is left exactly as it came, the order of the applied methods (``config.condify``) included; on
    success that order is kept too. A PEFT model is unwrapped (its base model is calibrated: the
    method's own options say what is trained).
    """
    from .batches import as_batches, split_holdout, vocab_size
    from .convert import order_configs, unwrap
    from .evaluate import token_nlls
    from .run import Run, restore, snapshot

    model = unwrap(model)
    configs = applied_configs(model)
    if not configs:
        raise ModifyError("calibrate needs a modified model: call condify.modify(model, method=...) first")
    if method is None and len(configs) > 1:
        raise ConfigError(f"several methods are applied ({[c.method for c in configs]}); pass method=...")
    cfg = configs[0] if method is None else next((c for c in configs if c.method == method), None)
    if cfg is None:
        raise ModifyError(f"{method!r} is not applied to this model; applied: {[c.method for c in configs]}")
    spec = registry.get(cfg.method)
    if spec.calibrate is None or spec.options is None:
        raise ConfigError(f"{cfg.method!r} has no calibration step")
    opts = spec.options.from_options(**options)
    device = next(model.parameters()).device
    vocab = vocab_size(model)
    fit, held = split_holdout(as_batches(data, device, vocab), holdout, vocab)
    run = Run(model, fit, held, progress=progress, guard=keep_if_better)
    start = time.perf_counter()
    snap = snapshot(model)
    try:
        dense = token_nlls(run.teacher(), held, progress=False) if held else None
        entries = spec.calibrate(model, run, opts)
        run.drop_teacher()
        order_configs(model, [c.method for c in configs])  # a method re-applied by its sweep stays in place
        measured = _measure(model, cfg.method, run) if held else {}
    except BaseException:
        run.drop_teacher()
        restore(model, snap)
        raise
    result: dict[str, Any] = {"method": cfg.method, "dense_ppl": None, "ppl": None, "ratio": None}
    result.update({"ratio_high": None, "executed": None, "tokens": run.tokens, **measured})
    if dense is not None:
        result.update(_quality(dense, result.pop("nlls")))
    result.update({k: v for k, v in entries.items() if k not in result})  # the schema's keys are the core's
    result["seconds"] = time.perf_counter() - start
    _report(result, len(held), 0 if dense is None else dense.numel())
    return result


def _quality(dense: torch.Tensor, nlls: torch.Tensor) -> dict[str, float]:
    """Perplexities, their ratio and its upper bound from per-token NLLs of one held-out text."""
    from .run import paired_change

    rise, se = paired_change(dense, nlls)
    return {
        "dense_ppl": math.exp(float(dense.mean())),
        "ppl": math.exp(float(nlls.mean())),
        "ratio": math.exp(rise),
        "ratio_high": math.exp(rise + WARN_SE * se),
    }


def _measure(model: nn.Module, method: str, run: Any) -> dict[str, Any]:
    """Held-out perplexity and executed fractions (per kind of site) of ``method``."""
    import contextlib

    from .evaluate import token_nlls

    with (run.eval_mode or contextlib.nullcontext)(), track(model) as t:
        out: dict[str, Any] = {"nlls": token_nlls(model, run.held, progress=False)}
    kinds = sorted({c.kind for c in t.sites.values() if c.method == method})
    main = "mlp" if "mlp" in kinds else (kinds[0] if kinds else None)
    if main is not None:
        out["executed"] = t.fraction(method, None if main == "layer" else main)
        out["executed_per_layer"] = t.per_layer(method, main)
    for k in kinds:
        if k not in (main, "layer"):
            out[f"executed_{k}"] = t.fraction(method, k)
    return out


def _report(result: dict[str, Any], held: int, tokens: int) -> None:
    if result["ratio"] is None:
        log.warning("condify.calibrate(%s): no held-out batch, quality not measured", result["method"])
        return
    executed = result["executed"]
    msg = (
        f"condify.calibrate({result['method']}): held-out perplexity {result['dense_ppl']:.3g} -> "
        f"{result['ppl']:.3g} (x{result['ratio']:.3f}) on {held} batch(es) ({tokens} tokens)"
        + (f", {executed:.1%} of the compute executed" if executed is not None else "")
    )
    log.info(msg)
    fix = "calibrate longer (more data or steps) or ask for less sparsity"
    if result["ratio"] > WARN_RATIO:
        warnings.warn(f"{msg}: more than x{WARN_RATIO} worse than dense; {fix}", QualityWarning, stacklevel=3)
    elif result["ratio_high"] > WARN_RATIO:
        warnings.warn(
            f"{msg}: up to x{result['ratio_high']:.3f} within the hold-out's noise ({WARN_SE:g} standard "
            f"errors), so it may be more than x{WARN_RATIO} worse than dense; hold out more tokens "
            f"(holdout=...) to measure it, or {fix}",
            QualityWarning,
            stacklevel=3,
        )
