"""Patching primitives: what condify attaches to one module, and the call-argument helpers its forwards use.

Modules are patched *in place*: the original HF module object stays at its path (same class, same
parameter names, so hooks, ``output_hidden_states``, gradient checkpointing and PEFT keep working);
:func:`patch` adds new child modules under new names (e.g. ``router``) and an instance-level
``forward``; :func:`unpatch` removes exactly those. The walk over a model is :mod:`condify.convert`'s.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .tracking import Count


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
    """What condify added to one module (kept on the module as ``_condify_patch``).

    ``peft_safe``: copied from the :class:`Target`; whether PEFT adapters inside the module leave
    ``unmodify`` exact."""

    method: str
    children: tuple[str, ...]
    state: SiteState
    peft_safe: bool = False
    forward: Callable[..., Any] | None = field(default=None, repr=False)  # the function condify installed
    previous: Any = field(default=None, repr=False)  # the forward it replaced (None: the class's)


@dataclass
class Target:
    """One module a method will convert, found (and checked) before anything is mutated.

    ``peft_safe``: the method converts (and ``unmodify`` restores) this module exactly even with PEFT
    adapters inside it (it calls the wrapped submodules and changes no weight in place). When False,
    ``modify``/``unmodify`` refuse a target that holds PEFT tuner layers.
    """

    path: str
    module: nn.Module
    layer: int
    kind: str = "layer"
    peft_safe: bool = False


def patch(
    module: nn.Module,
    method: str,
    state: SiteState,
    forward: Callable[..., Any] | None = None,
    children: dict[str, nn.Module] | None = None,
) -> None:
    """Attach ``children`` under new names and (optionally) replace ``forward`` on this instance.

    A forward hook set by accelerate (``device_map``, ``cpu_offload``: ``module._hf_hook`` around
    ``module._old_forward``) keeps running: condify's forward goes inside it, as ``_old_forward``. An
    instance forward set by someone else is remembered and put back by :func:`unpatch`."""
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
    previous = None
    if forward is not None:
        slot = "_old_forward" if _hooked(module) else "forward"
        previous = module.__dict__.get(slot)
        setattr(module, slot, types.MethodType(forward, module))
    module._condify_patch = Patch(method, tuple(children), state, forward=forward, previous=previous)


def _is_class_forward(module: nn.Module, fwd: Any) -> bool:
    return getattr(fwd, "__func__", None) is type(module).forward and getattr(fwd, "__self__", None) is module


def _hooked(module: nn.Module) -> bool:
    """Whether accelerate's ``add_hook_to_module`` wraps ``module`` (its forward calls ``_old_forward``)."""
    return getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__


def state(module: nn.Module) -> SiteState:
    """The typed state condify attached to a converted ``module``."""
    return module._condify_patch.state


def unpatch(module: nn.Module) -> None:
    """Remove what :func:`patch` added (children that are already gone are skipped)."""
    p: Patch = module.__dict__.pop("_condify_patch")
    for slot in ("_old_forward", "forward"):  # wherever condify's forward is now (a hook may have come)
        fwd = module.__dict__.get(slot)
        if p.forward is not None and getattr(fwd, "__func__", None) is p.forward:
            if p.previous is not None and not (slot == "forward" and _is_class_forward(module, p.previous)):
                setattr(module, slot, p.previous)
            elif slot == "forward":
                del module.__dict__["forward"]
            else:  # accelerate's hook was added after condify: it calls the class's forward again
                module._old_forward = types.MethodType(type(module).forward, module)
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


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or inf (used by debug checks)."""
    if not torch.isfinite(t).all():
        raise FloatingPointError(
            f"{name}: non-finite values (NaN/inf) in the input; check the model's inputs and dtype"
        )


_PARAMS: dict[type, tuple[tuple[str, ...], frozenset[str]]] = {}


def _params(cls: type) -> tuple[tuple[str, ...], frozenset[str]]:
    """``cls.forward``'s positional parameter names (after ``self``) and all its named parameters, cached
    in a plain dict of tuples: torch.compile traces a lookup there, not ``inspect.Signature.bind``."""
    if cls not in _PARAMS:
        ps = list(inspect.signature(cls.forward).parameters.values())[1:]
        pos = tuple(p.name for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        _PARAMS[cls] = pos, frozenset(p.name for p in ps if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return _PARAMS[cls]


def bind_args(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a ``module.forward(*args, **kwargs)`` call by name (``**kwargs`` entries flat)."""
    pos, _ = _params(type(module))
    if len(args) > len(pos):
        raise TypeError(
            f"{type(module).__name__}.forward takes {len(pos)} positional arguments, got {len(args)}"
        )
    named = dict(zip(pos, args, strict=False))
    clash = [k for k in kwargs if k in named]
    if clash:
        raise TypeError(f"{type(module).__name__}.forward got multiple values for {clash}")
    named.update(kwargs)
    return named


_CACHE_NAMES = ("cache", "past_key_values")


def cache_key(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes the KV cache: ``cache`` since transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in _params(type(module))[1] else "past_key_values"


def split_layer_args(
    layer: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Split a decoder-layer call into ``hidden_states`` and the remaining arguments, by name.

    The KV cache is returned under the layer's own keyword (:func:`cache_key`), whichever name the
    caller used."""
    out = bind_args(layer, args, kwargs)
    hidden = out.pop("hidden_states")
    caches = [out.pop(n) for n in _CACHE_NAMES if n in out]
    cache = next((c for c in caches if c is not None), None)
    if caches:
        out[cache_key(layer)] = cache
    return hidden, out
