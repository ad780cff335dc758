"""Method registry: name -> (config class, transform). A new method is one folder plus one `register` call."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .adapters import Adapter
    from .config import MethodConfig


@dataclass(frozen=True)
class Method:
    """How one method plugs into condify.

    - ``plan(model, adapter, config) -> list[str]``: validate against the model (raise before any
      mutation) and return the module paths the method will patch, so conflicts are found up front.
    - ``apply(model, adapter, config, from_checkpoint)``: mutate. ``from_checkpoint`` means weights
      will be loaded right after, so skip data-dependent initialisation.
    - ``remove(model, adapter, config)``: undo ``apply`` exactly (optional: default unpatches).
    - ``calibrate(model, adapter, config, batches, **options)``: the data-dependent step.
    - ``recipes``: named budgets -> (modify options, calibrate options) used by the CLI and main
      job; ``"quick"`` (seconds, smoke tests) and ``"cpu"`` (minutes on a 2-core CPU) at least.
    """

    name: str
    description: str
    config_cls: type[MethodConfig]
    plan: Callable[[nn.Module, Adapter, MethodConfig], list[str]]
    apply: Callable[[nn.Module, Adapter, MethodConfig, bool], None]
    remove: Callable[[nn.Module, Adapter, MethodConfig], None] | None = None
    calibrate: Callable[..., Any] | None = None
    recipes: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)


_METHODS: dict[str, Method] = {}
# Built-in methods, imported lazily so `import condify` stays light.
_BUILTIN = {
    "layer-parallel": "condify.methods.layer_parallel",
    "mod-threshold": "condify.methods.mod_threshold",
    "dynamic-k": "condify.methods.dynamic_k",
}


def register(method: Method) -> Method:
    """Register a method under ``method.name``."""
    _METHODS[method.name] = method
    return method


def _load(name: str) -> None:
    if name not in _METHODS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])


def _load_builtins() -> None:
    for name in _BUILTIN:
        _load(name)


def get(name: str) -> Method:
    """Look up a method by name; unknown names get an error listing the known ones."""
    _load(name)
    if name not in _METHODS:
        _load_builtins()
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(_METHODS)}")
    return _METHODS[name]


def all_methods() -> Iterable[Method]:
    _load_builtins()
    return [_METHODS[k] for k in sorted(_METHODS)]
