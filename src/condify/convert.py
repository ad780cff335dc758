"""The core: ``modify``/``unmodify`` walk a model through its adapter and apply registered methods.

Modules are patched in place (:mod:`condify.patching`): the original HF module object stays at its
path, with the same class and parameter names; a method adds new children and an instance ``forward``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import registry
from .adapters import Adapter, get_adapter
from .config import ConfigError, MethodConfig
from .patching import ModifyError, patched, unpatch

CONFIG_KEY = "condify"
FORMAT_VERSION = 1


def unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (``PeftModel`` -> ``get_base_model()``, a PEFT tuner
    such as ``LoraModel`` -> ``.model``); anything else as it is. PEFT is never imported here: a model
    can only be a PEFT wrapper if ``peft`` is already loaded."""
    peft = sys.modules.get("peft")
    if peft is None:
        return model
    if isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is not None and isinstance(model, tuners.BaseTuner):
        model = model.model
    return model


def peft_layers(module: nn.Module, prefix: str = "") -> list[str]:
    """Paths of the PEFT tuner layers (LoRA, IA3, ...) inside ``module`` (none if peft is not loaded)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return []
    return [n for n, m in module.named_modules(prefix=prefix) if isinstance(m, tuners.BaseTunerLayer)]


def _recorded_configs(model: nn.Module) -> list[MethodConfig]:
    """The configs ``config.condify`` records, whether or not the modules are converted."""
    state = getattr(model.config, CONFIG_KEY, None) or {}
    check_state(state, "config.condify")
    return [method_spec(d["method"]).config_cls.from_dict(d) for d in state.get("methods", [])]


def applied_configs(model: nn.Module) -> list[MethodConfig]:
    """The method configs applied to ``model``, in order.

    The model's modules are the truth: a method that ``config.condify`` records but that converts no
    module (e.g. a condify folder loaded with plain ``AutoModelForCausalLM.from_pretrained``, which
    builds the dense model and keeps the config entry) is not applied: such a stale entry is ignored,
    with one warning per model. A successful :func:`modify` drops it from the config and
    :func:`condify.save_pretrained` writes the folder without it; queries and refused calls leave the
    config as it is. Where modules still run condify's forwards without condify's record (stripped
    outside condify) the entries count, so that ``unmodify`` refuses the half-converted model.
    """
    check_model(model, "condify")
    model = unwrap(model)
    configs = _recorded_configs(model)
    if not configs:
        return configs
    owners = {m._condify_patch.method for _, m in patched(model)}
    live = [c for c in configs if c.method in owners]
    if len(live) == len(configs) or _remnants(model):
        return configs
    if model not in _WARNED_STALE:
        _WARNED_STALE.add(model)
        stale = [c.method for c in configs if c.method not in owners]
        warnings.warn(
            f"config.condify records {stale} but no module of this {type(model).__name__} is converted by "
            f"{'it' if len(stale) == 1 else 'them'}: the model is dense there (it was probably loaded without "
            f"condify, e.g. with AutoModelForCausalLM.from_pretrained), and the stale entry is ignored (modify "
            f"and condify.save_pretrained drop it). Load condify checkpoints with condify.from_pretrained",
            UserWarning,
            stacklevel=3,
        )
    return live


_WARNED_STALE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models warned about a stale config.condify


@contextlib.contextmanager
def live_configs(model: nn.Module) -> Iterator[list[MethodConfig]]:
    """While open, ``config.condify`` holds only the applied configs (:func:`applied_configs`); the
    recorded entry is put back afterwards, whatever happens (e.g. for a save)."""
    model = unwrap(model)
    live = applied_configs(model)
    had, saved = hasattr(model.config, CONFIG_KEY), getattr(model.config, CONFIG_KEY, None)
    _set_configs(model, live)
    try:
        yield live
    finally:
        if had:
            setattr(model.config, CONFIG_KEY, saved)
        elif hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)


def _remnants(model: nn.Module) -> bool:
    """Whether some module still runs a condify forward without condify's record of it (the record was
    stripped outside condify): the model is neither converted nor dense, and ``unmodify`` says so."""
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        func = getattr(fwd, "__func__", None)
        if (
            func is not None
            and getattr(func, "__module__", "").startswith("condify.")
            and not hasattr(m, "_condify_patch")
        ):
            return True
    return False


def check_state(state: Any, where: str) -> None:
    """Raise :class:`ConfigError` unless ``state`` is a condify record this version reads:
    ``{"version": 1..FORMAT_VERSION, "methods": [{"method": name, ...}, ...]}``."""
    if not state:
        return
    if not isinstance(state, dict) or not isinstance(state.get("methods"), list):
        raise ConfigError(f"{where} must be a dict with a list of `methods`, got {state!r:.200}")
    version = state.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(
            f"{where}: format version {version!r} is not one this condify understands (1..{FORMAT_VERSION}); "
            f"upgrade condify"
        )
    for i, d in enumerate(state["methods"]):
        if not isinstance(d, dict) or not isinstance(d.get("method"), str):
            raise ConfigError(f"{where}: methods[{i}] must be a dict with a `method` name, got {d!r:.200}")


def _set_configs(model: nn.Module, configs: list[MethodConfig]) -> None:
    model = unwrap(model)
    if configs:
        setattr(
            model.config, CONFIG_KEY, {"version": FORMAT_VERSION, "methods": [c.to_dict() for c in configs]}
        )
    elif hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)


def update_config(model: nn.Module, cfg: MethodConfig) -> None:
    """Record a changed config of an applied method (e.g. after calibration chose its layers)."""
    _set_configs(model, [cfg if c.method == cfg.method else c for c in applied_configs(model)])


def order_configs(model: nn.Module, methods: list[str]) -> None:
    """Put the applied configs back in the order of ``methods`` (e.g. after a method was removed and
    re-applied during its calibration, which appends it); methods not named keep their place at the end."""
    configs = applied_configs(model)
    rank = {m: i for i, m in enumerate(methods)}
    _set_configs(model, sorted(configs, key=lambda c: rank.get(c.method, len(rank))))


def free_layers(model: nn.Module, method: str) -> list[int]:
    """Indices of the decoder layers in which no method other than ``method`` converts anything: the
    layers ``method`` may use without overlapping another method (e.g. in a calibration sweep)."""
    model = unwrap(model)
    adapter = get_adapter(model)
    layers = adapter.layer_list(model)
    taken = [n for n, m in patched(model) if m._condify_patch.method != method]
    out = []
    for i in range(len(layers)):
        path = f"{adapter.layers}.{i}"
        if not any(n == path or n.startswith(path + ".") or path.startswith(n + ".") for n in taken):
            out.append(i)
    return out


def _targets(model: nn.Module) -> dict[str, str]:
    return {n: m._condify_patch.method for n, m in patched(model)}


def _as_config(method: str | MethodConfig, options: dict[str, Any]) -> MethodConfig:
    if isinstance(method, MethodConfig):
        if options:
            raise ConfigError("pass either a config object or keyword options, not both")
        return method
    return method_spec(method).config_cls.from_options(**options)


def method_spec(method: Any) -> registry.Method:
    """The registered method ``method`` names; :class:`ConfigError` (listing the known ones) otherwise."""
    if not isinstance(method, str):
        raise ConfigError(
            f"`method` must be a method name (str) or a method config, got {method!r} "
            f"({type(method).__name__}); known methods: {sorted(registry.list_methods())}"
        )
    try:
        return registry.get(method)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_model(model: Any, what: str) -> None:
    """Raise :class:`ModifyError` unless ``model`` is a transformers model (an ``nn.Module`` with a config)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ModifyError(f"{what}: expected a transformers PreTrainedModel, got {type(model).__name__}")


def check_finite_weights(model: nn.Module, what: str, prefix: str = "") -> None:
    """Raise :class:`ModifyError` naming the first parameter holding NaN/inf (checked before any change;
    buffers are not weights: masks may hold -inf on purpose)."""
    for name, t in model.named_parameters(prefix):
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModifyError(
                f"{what}: parameter {name!r} holds {bad} non-finite value(s) (NaN/inf); the model's "
                f"weights are broken (check how it was loaded or trained); nothing was changed"
            )


def modify(
    model: nn.Module, method: str | MethodConfig, *, _from_checkpoint: bool = False, **options: Any
) -> nn.Module:
    """Convert ``model`` in place with ``method`` and return it.

    ``method`` is a registered name (see :func:`condify.list_methods`) with keyword ``options``, or a
    config object (not changed: the resolved copy is what gets recorded). Every check runs before the
    model is touched: on error it is left as it was.

    A PEFT model (``PeftModel`` or a tuner such as ``LoraModel``) is unwrapped: its base model is
    converted in place and the wrapper is returned, still wrapping it. Converting modules that already
    hold PEFT adapters is refused (:class:`ModifyError`) unless the method converts them exactly with
    the adapters inside (mod-threshold does: it calls the wrapped submodules and changes no weight);
    methods that permute, fuse or re-initialise from weights would leave the adapters misaligned, so
    there the order is: ``condify.modify`` (and ``calibrate``) first, then ``get_peft_model``.
    """
    check_model(model, "modify")
    wrapper, model = model, unwrap(model)
    cfg = _as_config(method, options)
    spec = registry.get(cfg.method)
    adapter = get_adapter(model)
    n = len(adapter.layer_list(model))
    cfg.check_layers(n)
    existing = applied_configs(model)
    if any(c.method == cfg.method for c in existing):
        raise ModifyError(
            f"this model is already modified with {cfg.method!r}; call condify.unmodify(model) first "
            f"to change its options"
        )
    cfg = cfg.resolved(n)
    targets = spec.targets(model, adapter, cfg)
    if not targets:
        raise ModifyError(
            f"{cfg.method}: the options {cfg.to_dict()} select nothing to convert in this model"
        )
    if not _from_checkpoint:  # a checkpoint's weights are loaded right after
        for t in targets:  # what the method converts (and may initialise from) must be finite
            check_finite_weights(t.module, f"modify ({cfg.method})", prefix=t.path)
    for t in targets:
        wrapped = [] if t.peft_safe else peft_layers(t.module, t.path)
        if wrapped:
            raise ModifyError(
                f"{cfg.method}: {t.path!r} holds PEFT adapters ({wrapped[0]!r}, ...), which {cfg.method} "
                f"cannot convert exactly (it changes or re-reads the wrapped weights); convert first, then "
                f"wrap: condify.modify(model, ...) (and condify.calibrate), then peft.get_peft_model(model, ...)"
            )
    taken = _targets(model)
    for t in targets:
        for other, owner in taken.items():
            if t.path == other or t.path.startswith(other + ".") or other.startswith(t.path + "."):
                raise ModifyError(
                    f"{cfg.method!r} would convert {t.path!r}, which overlaps {other!r} already converted by "
                    f"{owner!r}; methods compose only on disjoint layers (choose `layers=` to avoid it)"
                )
    try:
        for t in targets:
            spec.patch(model, adapter, cfg, t, _from_checkpoint)
            if hasattr(t.module, "_condify_patch"):
                t.module._condify_patch.peft_safe = t.peft_safe
        if spec.attach is not None:
            spec.attach(model, adapter, cfg, targets)
    except Exception:
        _remove(model, adapter, cfg)  # leave no half-converted model behind
        raise
    _set_configs(model, [*existing, cfg])
    return wrapper


def _remove(model: nn.Module, adapter: Adapter, cfg: MethodConfig) -> None:
    spec = registry.get(cfg.method)
    if spec.remove is not None:
        spec.remove(model, adapter, cfg)
    for _, module in patched(model, cfg.method):
        unpatch(module)


def unmodify(model: nn.Module, method: str | None = None) -> nn.Module:
    """Undo ``modify`` (all methods, or only ``method``): original modules and weights, exactly.

    Everything is checked first (the config, every converted module still holding what condify
    added); on error the model is left as it was. A PEFT wrapper is unwrapped (its base model is
    restored, the wrapper returned); converted modules that hold PEFT adapters are refused unless their
    method restores them exactly with the adapters inside (merge the adapters first:
    ``model = peft_model.merge_and_unload()``)."""
    check_model(model, "unmodify")
    wrapper, model = model, unwrap(model)
    configs = applied_configs(model)
    if not configs:
        raise ModifyError("this model is not modified by condify; nothing to undo")
    if method is not None and method not in {c.method for c in configs}:
        raise ModifyError(f"{method!r} is not applied; applied: {[c.method for c in configs]}")
    adapter = get_adapter(model)
    for cfg in configs:
        if method is not None and cfg.method != method:
            continue
        sites = patched(model, cfg.method)
        if not sites:
            raise ModifyError(
                f"unmodify: config.condify records {cfg.method!r} but no module is converted by it; the "
                f"model was changed outside condify (reload it)"
            )
        for path, module in sites:
            wrapped = [] if module._condify_patch.peft_safe else peft_layers(module, path)
            if wrapped:
                raise ModifyError(
                    f"unmodify: {path!r} (converted by {cfg.method!r}) holds PEFT adapters ({wrapped[0]!r}, ...) "
                    f"trained on the converted layout; undoing {cfg.method!r} under them would misalign them. "
                    f"Merge them first (model = peft_model.merge_and_unload()), then condify.unmodify(model)"
                )
            gone = [c for c in module._condify_patch.children if c not in module._modules]
            if gone:
                raise ModifyError(
                    f"unmodify: {path!r} (converted by {cfg.method!r}) has lost {gone}, which condify added; "
                    f"it cannot be undone exactly, so nothing was changed (reload the model)"
                )
    keep = []
    for cfg in reversed(configs):
        if method is None or cfg.method == method:
            _remove(model, adapter, cfg)
        else:
            keep.insert(0, cfg)
    _set_configs(model, keep)
    return wrapper


def describe(model: nn.Module) -> str:
    """A short human-readable account of what condify converted where.

    Per site: what its state reports (:meth:`SiteState.describe`: measured values such as a keep-rate)
    and the scalar buffers of what condify added (e.g. a calibrated threshold ``tau``). An option of the
    method line that the sites hold themselves shows their common value, or ``per site`` where they
    differ, never a value the model no longer uses. A model whose modules are not converted is dense,
    whatever ``config.condify`` says (see :func:`applied_configs`)."""
    check_model(model, "describe")
    model = unwrap(model)
    configs = applied_configs(model)
    if not configs:
        return f"{type(model).__name__}: dense (not modified by condify)"
    lines = [f"{type(model).__name__}: {len(configs)} condify method(s)"]
    for cfg in configs:
        opts = {k: v for k, v in cfg.to_dict().items() if k not in ("method", "version")}
        sites = [(path, module, _site_values(module)) for path, module in patched(model, cfg.method)]
        for k in opts:
            values = [shown[k] for _, _, shown in sites if k in shown]
            if values:
                opts[k] = values[0] if all(v == values[0] for v in values) else "per site"
        lines.append(f"- {cfg.method}: {opts}")
        for path, module, shown in sites:
            extra = ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            added = ", ".join(module._condify_patch.children)
            lines.append(f"    {path}" + (f" (+{added})" if added else "") + (f": {extra}" if extra else ""))
    n_new = sum(
        p.numel()
        for _, m in patched(model)
        for c in m._condify_patch.children
        for p in m.get_submodule(c).parameters()
    )
    lines.append(f"new parameters: {n_new:,}")
    return "\n".join(lines)


def _site_values(module: nn.Module) -> dict[str, Any]:
    """What :func:`describe` shows for one converted module: its state's entries, then the scalar
    floating-point buffers of the children condify added (their current values)."""
    shown = dict(module._condify_patch.state.describe())
    for c in module._condify_patch.children:
        for name, b in module.get_submodule(c).named_buffers():
            if b.dim() == 0 and b.is_floating_point() and b.device.type != "meta":
                shown.setdefault(name.rpartition(".")[2], round(float(b), 4))
    return shown


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
