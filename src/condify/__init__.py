"""condify: turn dense Hugging Face LLMs into conditional-compute models.

model = condify.modify(model, method="layer-parallel", pairs=2)
condify.calibrate(model, batches)
condify.save_pretrained(model, "out/"); model = condify.from_pretrained("out/")
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from . import methods, registry
from .adapters import UnsupportedModelError
from .config import ConfigError, MethodConfig
from .convert import ModifyError, applied_configs, describe, modify, unmodify
from .serialization import CheckpointError, from_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MethodConfig",
    "ModifyError",
    "UnsupportedModelError",
    "calibrate",
    "describe",
    "from_pretrained",
    "methods",
    "modify",
    "save_pretrained",
    "unmodify",
]


def calibrate(
    model: nn.Module, data: Any, *, method: str | None = None, progress: bool = True, **options: Any
) -> Any:
    """Run the data-dependent step of the applied method(s) on ``data``.

    ``data``: an iterable of ``input_ids`` tensors or of dicts with ``input_ids``/``attention_mask``.
    With several methods applied, name one with ``method=`` (options differ per method).
    Returns what the method's calibrate returns (a dict of measurements).
    """
    from .adapters import get_adapter
    from .training import as_batches

    configs = applied_configs(model)
    if not configs:
        raise ModifyError("calibrate needs a modified model: call condify.modify(model, method=...) first")
    if method is None and len(configs) > 1:
        raise ConfigError(f"several methods are applied ({[c.method for c in configs]}); pass method=...")
    cfg = configs[0] if method is None else next((c for c in configs if c.method == method), None)
    if cfg is None:
        raise ModifyError(f"{method!r} is not applied to this model; applied: {[c.method for c in configs]}")
    spec = registry.get(cfg.method)
    if spec.calibrate is None:
        raise ConfigError(f"{cfg.method!r} has no calibration step")
    accepted = {
        n for n, p in inspect.signature(spec.calibrate).parameters.items() if p.kind is p.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"calibrate({cfg.method!r}): unknown options {unknown}; accepted: {sorted(accepted)}"
        )
    device = next(model.parameters()).device
    batches = as_batches(data, device)
    return spec.calibrate(model, get_adapter(model), cfg, batches, progress=progress, **options)
