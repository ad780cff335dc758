"""Method registry: name -> (config class, transform). A new method is one folder plus one `register` call."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .adapters import Adapter
    from .config import MethodConfig, Options
    from .patching import Target


@dataclass(frozen=True)
class Data:
    """The calibration text a recipe asks for: ``num_batches`` batches of ``batch_size`` x ``seq_len``."""

    batch_size: int
    seq_len: int
    num_batches: int


@dataclass(frozen=True)
class Recipe:
    """A named budget: options for ``modify`` and ``calibrate`` and the text to calibrate on."""

    modify: dict[str, Any]
    calibrate: dict[str, Any]
    data: Data


class TrainingHooks(Protocol):
    """One method's part in a user's training loop (made by ``Method.training`` when
    :func:`condify.integrations.attach` arms a model)."""

    def begin_forward(self) -> None:
        """A forward of the model starts: drop what the last one recorded."""

    def loss(self) -> torch.Tensor | None:
        """The method's auxiliary loss of the last forward (None: no term)."""

    def after_step(self) -> dict[str, float]:
        """Per-step maintenance after an optimiser step (e.g. move router biases); returns a status."""

    def close(self) -> None:
        """Stop recording (the sites are left as before ``Method.training`` was called)."""


@dataclass(frozen=True)
class Method:
    """How one method plugs into condify. The core (:func:`condify.convert.modify`) owns the walk:

    - ``targets(model, adapter, config) -> list[Target]``: validate against the model and list what
      will be converted (raise before any mutation; mutate nothing);
    - ``patch(model, adapter, config, target, from_checkpoint)``: convert one target
      (``from_checkpoint``: weights are loaded right after, so skip data-dependent initialisation);
    - ``attach(model, adapter, config, targets)``: optional model-level set-up after every target;
    - ``remove(model, adapter, config)``: optional; undo what ``patch``/``attach`` did beyond the
      children and forwards the core removes;
    - ``calibrate(model, run, options) -> dict``: the data-dependent step, with a
      :class:`condify.run.Run` (fit / held-out batches, teacher, progress) and validated
      ``options`` (an instance of ``options``, a :class:`condify.config.Options` dataclass);
    - ``recipes``: named budgets, ``"quick"`` (seconds) and ``"cpu"`` (minutes on 2 cores) at least;
    - ``training(model, options) -> TrainingHooks``: optional; the per-step terms of ``calibrate`` for
      a user's own training loop (:mod:`condify.integrations`), reading the ``training_options`` of
      ``options`` (an instance of ``options``, the calibrate options, so defaults are calibrate's).
    """

    name: str
    description: str
    config_cls: type[MethodConfig]
    targets: Callable[[nn.Module, Adapter, MethodConfig], list[Target]]
    patch: Callable[[nn.Module, Adapter, MethodConfig, Target, bool], None]
    attach: Callable[[nn.Module, Adapter, MethodConfig, list[Target]], None] | None = None
    remove: Callable[[nn.Module, Adapter, MethodConfig], None] | None = None
    calibrate: Callable[..., dict[str, Any]] | None = None
    options: type[Options] | None = None
    recipes: dict[str, Recipe] = field(default_factory=dict)
    training: Callable[[nn.Module, Options], TrainingHooks] | None = None
    training_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, r in self.recipes.items():  # a recipe that cannot run is a bug: fail at import
            self.config_cls.from_options(**r.modify)
            if self.options is not None:
                self.options.from_options(**r.calibrate)
            elif r.calibrate:
                raise ValueError(f"{self.name}: recipe {name!r} has calibrate options but no calibrate")
        if self.training is not None and self.options is None:
            raise ValueError(f"{self.name}: `training` reads calibrate options, but the method has none")
        unknown = (
            set(self.training_options) - {f.name for f in fields(self.options)} if self.options else set()
        )
        if unknown:
            raise ValueError(f"{self.name}: training_options {sorted(unknown)} are not calibrate options")


_METHODS: dict[str, Method] = {}
# Built-in methods, imported lazily so `import condify` stays light.
_BUILTIN = {
    "layer-parallel": "condify.methods.layer_parallel",
    "mod-threshold": "condify.methods.mod_threshold",
    "dynamic-k": "condify.methods.dynamic_k",
    "lte": "condify.methods.lte",
    "mot": "condify.methods.mot",
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


def list_methods() -> dict[str, str]:
    """Registered method names with a one-line description each."""
    return {m.name: m.description for m in all_methods()}
