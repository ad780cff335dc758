"""Save and load converted models: configs in ``config.json`` under ``condify``, weights in safetensors.

No pickle and no remote code. The saved folder is also a valid dense checkpoint for vanilla
``transformers`` (condify's extra tensors are ignored as unexpected keys).

Both directions check before they act: :func:`save_pretrained` refuses a bad target (``None``, an existing
file) or a model without materialised weights before writing anything, writes into a temporary folder
and only then replaces the weight files of an earlier save (stale shards and indexes included);
:func:`from_pretrained` checks the folder, ``config.json`` (condify format version), every weight file's
header, that no original tensor is missing and that condify's tensors match its config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .config import ConfigError
from .convert import (
    CONFIG_KEY,
    FORMAT_VERSION,
    _recorded_configs,
    applied_configs,
    check_model,
    check_state,
    live_configs,
    method_spec,
    modify,
    peft_layers,
    unwrap,
)
from .patching import patched


class CheckpointError(ValueError):
    """A checkpoint (or a save target) is unusable: missing or invalid files, an unknown format version,
    missing original tensors, or a condify config that disagrees with the weights."""


INDEX = "model.safetensors.index.json"
# files of an earlier save that a new save replaces (weights and their indexes, any format)
_WEIGHT_FILE = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
    r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)$"
)


def _as_path(path: Any, what: str) -> Path:
    if path is None or not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise CheckpointError(f"{what}: expected a folder path (str or os.PathLike), got {path!r}")
    return Path(path)


def save_pretrained(model: nn.Module, path: str | Path, **kwargs: Any) -> None:
    """``model.save_pretrained(path)`` with what condify needs (safetensors only).

    Checks first (nothing is written on error): ``path`` is a folder path (``None`` and existing files
    are refused), the model is a transformers model with real (not meta-device) weights. The save goes
    to a temporary folder next to ``path``; on success the weight files and indexes of an earlier save
    in ``path`` are removed and the new files moved in; other files in ``path`` are kept.
    """
    path = _as_path(path, "save_pretrained")
    try:
        check_model(model, "save_pretrained")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"save_pretrained: {path} exists and is not a folder; choose another path")
    wrapped = peft_layers(unwrap(model))
    if wrapped or unwrap(model) is not model:
        raise CheckpointError(
            f"save_pretrained: the model holds PEFT adapters ({(wrapped or ['a PEFT wrapper'])[0]!r}, ...); a "
            f"condify checkpoint holds plain weights under their original names. Merge them first "
            f"(condify.save_pretrained(peft_model.merge_and_unload(), path)), or save only the adapters with "
            f"peft_model.save_pretrained(path)"
        )
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta:
        raise CheckpointError(
            f"save_pretrained: the model has no weights to save ({len(meta)} tensors on the meta device, "
            f"e.g. {meta[0]!r}); load or materialise its weights first"
        )
    applied_configs(model)  # a malformed config.condify is refused before writing
    if getattr(model.config, "quantization_config", None) is not None and _is_gguf(model):
        # GGUF models are dequantised on load; the quantizer would refuse to save them
        model.hf_quantizer = None
        del model.config.quantization_config
    parent = path.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=".condify-save-", dir=parent if parent.is_dir() else None))
    try:
        with live_configs(model):  # a stale entry (no module converted by it) is not written
            model.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.iterdir():
            if old.is_file() and _WEIGHT_FILE.match(old.name):
                old.unlink()
        for new in tmp.iterdir():
            shutil.move(str(new), str(path / new.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_gguf(model: nn.Module) -> bool:
    q = model.config.quantization_config
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def _weight_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint (from its index when sharded), each checked to exist and to
    have a valid header."""
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{index}: not a valid safetensors index ({type(e).__name__}: {e})"
            ) from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        return []
    for f in files:
        if not isinstance(f, str) or not (path / f).is_file():
            raise CheckpointError(f"{path}: weight file {f} is missing")
        try:
            with safe_open(str(path / f), framework="pt") as h:
                h.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path / f}: not a valid safetensors file ({e}); it may be truncated or corrupt, re-save it"
            ) from None
    return files


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            tensors.update(load_file(str(path / f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path / f}: cannot read the tensors ({e}); re-save the checkpoint"
            ) from None
    return tensors


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"from_pretrained: {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"from_pretrained: {path} is not a folder (expected a saved checkpoint folder)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"from_pretrained: {path} has no config.json; it is not a saved model")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    try:
        check_state(config.get(CONFIG_KEY), f"{cfg_file}: `{CONFIG_KEY}`")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    state = config.get(CONFIG_KEY)
    if state and "version" not in state:
        raise CheckpointError(
            f"{cfg_file}: `{CONFIG_KEY}` has no format `version` (expected 1..{FORMAT_VERSION})"
        )
    for d in (state or {}).get("methods", []):
        try:
            method_spec(d["method"])
        except ConfigError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    return config


def from_pretrained(path: str | Path, **hf_kwargs: Any) -> nn.Module:
    """Load a folder written by :func:`save_pretrained`: dense model, then condify structure, then weights.

    Raises :class:`CheckpointError` for a missing or invalid folder, ``config.json`` or weight file (the
    file is named), a condify format version this condify does not read, original tensors missing from
    the weights (transformers would initialise them randomly), and a ``config.json`` that records condify
    methods whose added tensors are all missing (a dense model re-saved with its stale ``condify`` entry:
    the error says to load it with ``AutoModelForCausalLM`` and convert it again)."""
    from transformers import AutoModelForCausalLM

    path = _as_path(path, "from_pretrained")
    config = _read_config(path)
    _weight_files(path)
    state = config.get(CONFIG_KEY)
    tl = logging.getLogger("transformers.modeling_utils")
    level = tl.level
    if state:  # the load report would list condify's extra keys as unexpected; we report the rest below
        tl.setLevel(logging.ERROR)
    strict_sizes = not hf_kwargs.pop("ignore_mismatched_sizes", False)
    hf_kwargs.pop("output_loading_info", None)  # condify reads the loading info itself
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), output_loading_info=True, ignore_mismatched_sizes=True, **hf_kwargs
        )
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: transformers could not load the checkpoint ({e})") from None
    finally:
        tl.setLevel(level)
    mismatched = [m if isinstance(m, str) else m[0] for m in info.get("mismatched_keys") or []]
    if mismatched and strict_sizes:
        shapes = {str(m[0]): tuple(m[1:]) for m in info["mismatched_keys"] if not isinstance(m, str)}
        shown = [f"{k} {shapes.get(k, '')}".strip() for k in sorted(mismatched)[:5]]
        raise CheckpointError(
            f"{path}: {len(mismatched)} tensor(s) of the original model have another shape in the weights "
            f"than config.json implies (name (checkpoint shape, model shape)): {shown}"
        )
    missing = sorted(set(info.get("missing_keys") or []) - set(mismatched))
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensor(s) of the original model are missing from the weights "
            f"({missing[:5]}{'...' if len(missing) > 5 else ''}); loading would leave them random. "
            f"Re-save the model with condify.save_pretrained."
        )
    if not state:
        return model
    configs = _recorded_configs(model)  # the modules are dense until condify converts them below
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
    if added and missing == sorted(added) and not unexpected:
        methods = [c["method"] for c in getattr(model.config, CONFIG_KEY)["methods"]]
        raise CheckpointError(
            f"{path}: config.json records condify {methods} but the weights hold none of the "
            f"{len(added)} tensor(s) condify adds (e.g. {missing[0]!r}): the folder was saved from a dense "
            f"model that kept config.json's `condify` entry (e.g. loaded with AutoModelForCausalLM."
            f"from_pretrained, then model.save_pretrained). Its weights are a dense model: load it with "
            f"transformers.AutoModelForCausalLM.from_pretrained (or delete `condify` from config.json) and "
            f"convert it again with condify.modify + condify.calibrate; save converted models with "
            f"condify.save_pretrained"
        )
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
