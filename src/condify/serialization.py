"""Save and load converted models: configs in ``config.json`` under ``condify``, weights in safetensors.

No pickle and no remote code. The saved folder is also a valid dense checkpoint for vanilla
``transformers`` (condify's extra tensors are ignored as unexpected keys).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .convert import CONFIG_KEY, applied_configs, modify, patched


class CheckpointError(ValueError):
    """A checkpoint's condify config and its weights disagree."""


def save_pretrained(model: nn.Module, path: str | Path, **kwargs: Any) -> None:
    """``model.save_pretrained(path)`` with what condify needs (safetensors only)."""
    if getattr(model.config, "quantization_config", None) is not None and _is_gguf(model):
        # GGUF models are dequantised on load; the quantizer would refuse to save them
        model.hf_quantizer = None
        del model.config.quantization_config
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)


def _is_gguf(model: nn.Module) -> bool:
    q = model.config.quantization_config
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).exists():
            raise CheckpointError(f"{path}: weight file {f} is missing")
        tensors.update(load_file(str(path / f)))
    return tensors


def from_pretrained(path: str | Path, **hf_kwargs: Any) -> nn.Module:
    """Load a folder written by :func:`save_pretrained`: dense model, then condify structure, then weights."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    state = config.get(CONFIG_KEY)
    tl = logging.getLogger("transformers.modeling_utils")
    level = tl.level
    if state:
        tl.setLevel(logging.ERROR)  # condify's extra keys are reported as unexpected; we load them below
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **hf_kwargs)
    finally:
        tl.setLevel(level)
    if not state:
        return model
    configs = applied_configs(model)
    delattr(model.config, CONFIG_KEY)
    for cfg in configs:
        modify(model, cfg, _from_checkpoint=True)
    _load_extra(model, _load_tensors(path), path)
    return model


def _load_extra(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load the condify-added tensors strictly and re-load in-place-changed originals."""
    expected = model.state_dict()
    added = {
        f"{p}.{c}.{k}" if p else f"{c}.{k}"
        for p, m in patched(model)
        for c in m._condify_patch.children
        for k in m.get_submodule(c).state_dict()
    }
    missing = sorted(k for k in added if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the condify config in config.json does not match the saved weights "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected: {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}). Re-save the model with condify.save_pretrained."
        )
    bad = [k for k, t in tensors.items() if t.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {bad[:5]} between config and weights")
    device = next(model.parameters()).device
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t.to(device))
