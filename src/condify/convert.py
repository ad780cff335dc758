"""The core: ``modify``/``unmodify`` walk a model through its adapter and apply registered methods.

Modules are patched *in place*: the original HF module object stays at its path (same class, same
parameter names, so hooks, ``output_hidden_states``, gradient checkpointing and PEFT keep working);
a method adds new child modules under new names (e.g. ``router``) and an instance-level ``forward``.
``unpatch`` removes exactly those.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from . import registry
from .adapters import Adapter, get_adapter
from .config import ConfigError, MethodConfig

if TYPE_CHECKING:
    from .tracking import Count

CONFIG_KEY = "condify"
FORMAT_VERSION = 1


class ModifyError(ValueError):
    """A conversion was refused; the model has not been changed."""


@dataclass
class SiteState:
    """Typed state of one converted module; each method subclasses it with its own fields.

    ``kind`` names what :func:`condify.track` counts there (``"mlp"``, ``"attention"``, ``"layer"``);
    ``counter`` is set only while a tracker is open (runtime, never saved).
    """

    layer: int
    kind: ClassVar[str] = "layer"
    counter: Count | None = field(default=None, init=False, repr=False, compare=False)

    def count(self, executed: float | torch.Tensor, total: float | torch.Tensor) -> None:
        """Add to the open tracker, if any: ``executed`` of ``total`` units of this site's compute ran."""
        if self.counter is not None:
            self.counter.executed += float(executed)
            self.counter.total += float(total)

    def describe(self) -> dict[str, Any]:
        """What ``condify.describe`` shows for this site (measured values, never internals)."""
        return {}


@dataclass
class Patch:
    """What condify added to one module (kept on the module as ``_condify_patch``)."""

    method: str
    children: tuple[str, ...]
    state: SiteState


@dataclass
class Target:
    """One module a method will convert, found (and checked) before anything is mutated."""

    path: str
    module: nn.Module
    layer: int
    kind: str = "layer"


def patch(
    module: nn.Module,
    method: str,
    state: SiteState,
    forward: Callable[..., Any] | None = None,
    children: dict[str, nn.Module] | None = None,
) -> None:
    """Attach ``children`` under new names and (optionally) replace ``forward`` on this instance."""
    if hasattr(module, "_condify_patch"):
        raise ModifyError(
            f"module {type(module).__name__} is already converted by {module._condify_patch.method!r}"
        )
    children = children or {}
    clash = [n for n in children if hasattr(module, n)]
    if clash:
        raise ModifyError(f"cannot add {clash} to {type(module).__name__}: the name already exists")
    for name, child in children.items():
        module.add_module(name, child)
    if forward is not None:
        module.forward = types.MethodType(forward, module)
    module._condify_patch = Patch(method, tuple(children), state)


def state(module: nn.Module) -> SiteState:
    """The typed state condify attached to a converted ``module``."""
    return module._condify_patch.state


def unpatch(module: nn.Module) -> None:
    """Remove what :func:`patch` added (children that are already gone are skipped)."""
    p: Patch = module.__dict__.pop("_condify_patch")
    module.__dict__.pop("forward", None)
    for name in p.children:
        if name in module._modules:
            delattr(module, name)


def patched(model: nn.Module, method: str | None = None) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module patched by ``method`` (any method if None)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "_condify_patch") and (method is None or m._condify_patch.method == method)
    ]


def applied_configs(model: nn.Module) -> list[MethodConfig]:
    """The method configs applied to ``model``, in order."""
    check_model(model, "condify")
    state = getattr(model.config, CONFIG_KEY, None) or {}
    check_state(state, "config.condify")
    return [method_spec(d["method"]).config_cls.from_dict(d) for d in state.get("methods", [])]


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
    if configs:
        setattr(
            model.config, CONFIG_KEY, {"version": FORMAT_VERSION, "methods": [c.to_dict() for c in configs]}
        )
    elif hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)


def update_config(model: nn.Module, cfg: MethodConfig) -> None:
    """Record a changed config of an applied method (e.g. after calibration chose its layers)."""
    _set_configs(model, [cfg if c.method == cfg.method else c for c in applied_configs(model)])


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
    """
    check_model(model, "modify")
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
        if spec.attach is not None:
            spec.attach(model, adapter, cfg, targets)
    except Exception:
        _remove(model, adapter, cfg)  # leave no half-converted model behind
        raise
    _set_configs(model, [*existing, cfg])
    return model


def _remove(model: nn.Module, adapter: Adapter, cfg: MethodConfig) -> None:
    spec = registry.get(cfg.method)
    if spec.remove is not None:
        spec.remove(model, adapter, cfg)
    for _, module in patched(model, cfg.method):
        unpatch(module)


def unmodify(model: nn.Module, method: str | None = None) -> nn.Module:
    """Undo ``modify`` (all methods, or only ``method``): original modules and weights, exactly.

    Everything is checked first (the config, every converted module still holding what condify
    added); on error the model is left as it was."""
    check_model(model, "unmodify")
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
    return model


def describe(model: nn.Module) -> str:
    """A short human-readable account of what condify converted where."""
    check_model(model, "describe")
    configs = applied_configs(model)
    if not configs:
        return f"{type(model).__name__}: dense (not modified by condify)"
    lines = [f"{type(model).__name__}: {len(configs)} condify method(s)"]
    for cfg in configs:
        opts = {k: v for k, v in cfg.to_dict().items() if k not in ("method", "version")}
        lines.append(f"- {cfg.method}: {opts}")
        for path, module in patched(model, cfg.method):
            shown = module._condify_patch.state.describe()
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


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or inf (used by debug checks)."""
    if not torch.isfinite(t).all():
        raise FloatingPointError(
            f"{name}: non-finite values (NaN/inf) in the input; check the model's inputs and dtype"
        )


@functools.cache
def _signature(cls: type) -> tuple[inspect.Signature, str | None]:
    sig = inspect.signature(cls.forward)
    return sig, next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)


_CACHE_NAMES = ("cache", "past_key_values")


def cache_key(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes the KV cache: ``cache`` since transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in _signature(type(module))[0].parameters else "past_key_values"


def split_layer_args(
    layer: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Split a decoder-layer call into ``hidden_states`` and the remaining arguments, by name.

    The KV cache is returned under the layer's own keyword (:func:`cache_key`), whichever name the
    caller used."""
    sig, var_kw = _signature(type(layer))
    named = dict(sig.bind(layer, *args, **kwargs).arguments)
    named.pop("self")
    extra = named.pop(var_kw, {}) if var_kw else {}
    hidden = named.pop("hidden_states")
    out = {**named, **extra}
    caches = [out.pop(n) for n in _CACHE_NAMES if n in out]
    cache = next((c for c in caches if c is not None), None)
    if caches:
        out[cache_key(layer)] = cache
    return hidden, out
