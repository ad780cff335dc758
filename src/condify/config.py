"""Base class for method configs: a validated, versioned dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class ConfigError(ValueError):
    """An option value is invalid; raised before the model is touched."""


@dataclasses.dataclass
class MethodConfig:
    """Options of one method. Subclasses set ``method`` and add fields; ``__post_init__`` validates.

    ``layers`` selects decoder layers by index (``None``: the method's default set).
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, range):
                self.layers = list(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ConfigError(
                    f"{self.method}: `layers` must be a list of layer indices, got {self.layers!r}"
                )
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"{self.method}: `layers` has duplicates: {self.layers}")
            self.layers = sorted(self.layers)
        self.validate()

    def validate(self) -> None:
        """Check option ranges; raise :class:`ConfigError` naming the option and its allowed range."""

    def check_layers(self, num_layers: int) -> None:
        """Raise if a selected layer index does not exist in a model with ``num_layers`` layers."""
        bad = [i for i in self.layers or [] if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(
                f"{self.method}: layer indices {bad} are out of range; this model has layers 0..{num_layers - 1}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = dict(data)
        data.pop("method", None)
        version = data.pop("version", cls.version)
        if version > cls.version:
            raise ConfigError(
                f"{cls.method}: checkpoint config version {version} is newer than this condify "
                f"understands ({cls.version}); upgrade condify"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown options {unknown}; known options: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build from keyword options, with a clear error for unknown names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown options {unknown}; known options: {sorted(known)}")
        return cls(**options)


def in_range(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    """Raise ConfigError unless ``value`` lies in the interval described by the bounds."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"`{name}` must be in {interval}, got {value!r}")
