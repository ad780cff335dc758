"""Validated option dataclasses: method configs (saved in ``config.json``) and calibrate options.

Every field is checked against its annotation (a bool is not an int, a string is not a number, NaN and
inf are refused) and against the bounds given with :func:`option`, in one place (:class:`Options`), so
a method config or a calibrate signature states its options once, with their ranges.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="Options")


class ConfigError(ValueError):
    """An option value is invalid; raised before the model is touched."""


def option(
    default: Any = None,
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a default and the allowed values (``choices`` or bounds)."""
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (bool is not int; int is accepted where float is)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, origin) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


_OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _allowed(meta: Any) -> str:
    """The allowed values of a field, for messages (``" (one of ('a', 'b'))"``, ``" (>= 1)"``, or "")."""
    if "choices" in meta:
        return f" (one of {meta['choices']})"
    bounds = [f"{_OPS[k]} {meta[k]}" for k in _OPS if k in meta]
    return f" ({' and '.join(bounds)})" if bounds else ""


@dataclasses.dataclass
class Options:
    """Base of every options dataclass: type and range checks in ``__post_init__``, then :meth:`validate`."""

    owner: ClassVar[str] = ""  # who the options belong to, for messages ("dynamic-k calibrate")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        # the options the caller gave explicitly (positionally or by name), for consistency checks
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))
        return self

    def given(self, name: str) -> bool:
        """Whether option ``name`` was passed explicitly when this object was built."""
        return name in getattr(self, "_given", ())

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name not in hints:
                continue
            value = getattr(self, f.name)
            if isinstance(value, range):
                value = list(value)
                setattr(self, f.name, value)
            hint = hints[f.name]
            if not _matches(value, hint):
                raise ConfigError(
                    f"{self.owner}: `{f.name}` must be {_type_name(hint)}{_allowed(f.metadata)}, "
                    f"got {value!r} ({type(value).__name__})"
                )
            self._check_bounds(f, value)
        self.validate()

    def _check_bounds(self, f: dataclasses.Field, value: Any) -> None:
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{self.owner}: `{f.name}` must be one of {meta['choices']}, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        if isinstance(value, float) and not math.isfinite(value) and (meta or math.isnan(value)):
            raise ConfigError(f"{self.owner}: `{f.name}` must be a finite number, got {value!r}")
        bounds = [(k, meta[k]) for k in ("ge", "gt", "le", "lt") if k in meta]
        ops = {
            "ge": (float.__ge__, ">="),
            "gt": (float.__gt__, ">"),
            "le": (float.__le__, "<="),
            "lt": (float.__lt__, "<"),
        }
        if not all(ops[k][0](float(value), float(b)) for k, b in bounds):
            kind = "a number" if "float" in str(f.type) else "an integer"  # what the option takes
            allowed = " and ".join(f"{ops[k][1]} {b}" for k, b in bounds)
            raise ConfigError(f"{self.owner}: `{f.name}` must be {kind} {allowed}, got {value!r}")

    def validate(self) -> None:
        """Checks across options; raise :class:`ConfigError` naming the options and the fix."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "version"]

    @classmethod
    def from_options(cls: type[T], **options: Any) -> T:
        """Build from keyword options, with a clear error for unknown names."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ConfigError(f"{cls.owner}: unknown options {unknown}; known options: {sorted(cls.names())}")
        return cls(**options)

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class MethodConfig(Options):
    """Options of one method, saved under ``config.json["condify"]``. Subclasses set ``method`` and
    ``VERSION`` and add fields.

    ``layers`` selects decoder layers by index (``None``: the method's default set). ``version`` is the
    format the config was written in: :attr:`VERSION` for a new config, the saved one for a loaded
    checkpoint (so a method can keep an old checkpoint's defaults).
    """

    method: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    layers: list[int] | None = None
    version: int = dataclasses.field(default=0, kw_only=True, compare=False, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.owner = cls.method

    def __post_init__(self) -> None:
        if self.version == 0:
            self.version = self.VERSION
        if isinstance(self.layers, range):
            self.layers = list(self.layers)
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ConfigError(
                    f"{self.method}: `layers` must be a list of layer indices, got {self.layers!r}"
                )
            if not self.layers:
                raise ConfigError(
                    f"{self.method}: `layers` is empty (selects no layer); pass at least one layer index, "
                    f"or None for the method's default set"
                )
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"{self.method}: `layers` has duplicates: {self.layers}")
            self.layers = sorted(self.layers)
        super().__post_init__()

    def check_layers(self, num_layers: int) -> None:
        """Raise if a selected layer index does not exist in a model with ``num_layers`` layers."""
        bad = [i for i in self.layers or [] if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(
                f"{self.method}: layer indices {bad} are out of range; this model has layers 0..{num_layers - 1}"
            )

    def check_selection(self, indices: list[int], num_layers: int) -> None:
        """Raise if the layer set a config resolved to (``indices``) selects nothing."""
        if not indices:
            which = f"`layers={self.layers}`" if self.layers is not None else "the default layer set"
            raise ConfigError(
                f"{self.method}: {which} selects no layer in a model with {num_layers} layer(s); "
                f"pass `layers=` with indices in 0..{num_layers - 1}"
            )

    def resolved(self, num_layers: int) -> MethodConfig:
        """This config with its defaults made explicit for a model of ``num_layers`` layers (what is saved)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = dict(data)
        data.pop("method", None)
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.VERSION:
            raise ConfigError(
                f"{cls.method}: checkpoint config version {version!r} is not one this condify understands "
                f"(1..{cls.VERSION}); upgrade condify"
            )
        known = set(cls.names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown options {unknown}; known options: {sorted(known)}")
        return cls(**cls.upgrade(data, version), version=version)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Options of a config saved in format ``version``, as this version reads them."""
        return data


def in_range(
    name: str,
    value: float,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    owner: str = "",
) -> None:
    """Raise ConfigError unless ``value`` is a number in the interval described by the bounds."""
    prefix = f"{owner}: " if owner else ""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ConfigError(f"{prefix}`{name}` must be a number, got {value!r}")
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{prefix}`{name}` must be in {interval}, got {value!r}")
