"""condify: turn dense Hugging Face LLMs into conditional-compute models.

model = condify.modify(model, method="layer-parallel", pairs=2)
condify.calibrate(model, batches)
condify.save_pretrained(model, "out/"); model = condify.from_pretrained("out/")
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from torch import nn

from . import registry
from .adapters import UnsupportedModelError
from .batches import DataError
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
    "track",
    "training_loss",
    "unmodify",
]

WARN_RATIO = 1.5  # calibrate warns when held-out perplexity exceeds this multiple of dense

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
    two or more). ``keep_if_better`` (default): a recovery fine-tune (dynamic-k's routed fine-tune, lte's
    hard stage, layer-parallel's paired-layer fine-tune, mod-threshold's training) that raises the held-out
    NLL beyond noise (one paired standard error) is undone and tried once more at a tenth of its rate
    (:meth:`condify.training.Run.keep_if_better`); ``False`` keeps it as trained. The result always has ``dense_ppl`` and ``ppl`` (held-out perplexity before and after, None without a hold-out), ``ratio``, ``executed``
    (fraction of the method's compute that ran on the held-out batches; None where nothing is skipped
    per token), ``tokens`` (trained on), ``seconds``, and the method's own entries. A ratio above 1.5 is logged and warned
    (:class:`QualityWarning`). On any error the model is left exactly as it came, the order of the
    applied methods (``config.condify``) included; on success that order is kept too. A PEFT model is
    unwrapped (its base model is calibrated: the method's own options say what is trained).
    """
    from .batches import as_batches, split_holdout, vocab_size
    from .convert import order_configs, unwrap
    from .training import Run, restore, snapshot

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
        dense_ppl = _perplexity(run.teacher(), held) if held else None
        entries = spec.calibrate(model, run, opts)
        run.drop_teacher()
        order_configs(model, [c.method for c in configs])  # a method re-applied by its sweep stays in place
        measured = _measure(model, cfg.method, run) if held else {}
    except BaseException:
        run.drop_teacher()
        restore(model, snap)
        raise
    result: dict[str, Any] = {"method": cfg.method, "dense_ppl": dense_ppl, "ppl": None, "ratio": None}
    result.update({"executed": None, "tokens": run.tokens, **measured})
    if dense_ppl is not None:
        result["ratio"] = result["ppl"] / dense_ppl
    result.update({k: v for k, v in entries.items() if k not in result})  # the schema's keys are the core's
    result["seconds"] = time.perf_counter() - start
    _report(result, len(held))
    return result


def _perplexity(model: nn.Module, batches: list) -> float:
    from .evaluate import perplexity

    return perplexity(model, batches, progress=False)


def _measure(model: nn.Module, method: str, run: Any) -> dict[str, Any]:
    """Held-out perplexity and executed fractions (per kind of site) of ``method``."""
    import contextlib

    with (run.eval_mode or contextlib.nullcontext)(), track(model) as t:
        out: dict[str, Any] = {"ppl": _perplexity(model, run.held)}
    kinds = sorted({c.kind for c in t.sites.values() if c.method == method})
    main = "mlp" if "mlp" in kinds else (kinds[0] if kinds else None)
    if main is not None:
        out["executed"] = t.fraction(method, None if main == "layer" else main)
        out["executed_per_layer"] = t.per_layer(method, main)
    for k in kinds:
        if k not in (main, "layer"):
            out[f"executed_{k}"] = t.fraction(method, k)
    return out


def _report(result: dict[str, Any], held: int) -> None:
    if result["ratio"] is None:
        log.warning("condify.calibrate(%s): no held-out batch, quality not measured", result["method"])
        return
    executed = result["executed"]
    msg = (
        f"condify.calibrate({result['method']}): held-out perplexity {result['dense_ppl']:.3g} -> "
        f"{result['ppl']:.3g} (x{result['ratio']:.3f}) on {held} batch(es)"
        + (f", {executed:.1%} of the compute executed" if executed is not None else "")
    )
    log.info(msg)
    if result["ratio"] > WARN_RATIO:
        warnings.warn(
            f"{msg}: more than x{WARN_RATIO} worse than dense; calibrate longer (more data or steps) or "
            f"ask for less sparsity",
            QualityWarning,
            stacklevel=3,
        )
