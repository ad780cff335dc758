"""Options of layer-parallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigError, MethodConfig, option


@dataclass
class LayerParallelConfig(MethodConfig):
    """Pair ``2·pairs`` consecutive layers starting at ``start``: (start, start+1), (start+2, start+3), ...

    Give either ``layers`` (a contiguous range of even length) or ``pairs`` with an optional ``start``
    (default: the pairs end just before the last layer; ``calibrate`` sweeps for the best range).
    ``fuse`` runs each pair as one set of wide GEMMs where the architecture allows it.
    """

    method: ClassVar[str] = "layer-parallel"

    pairs: int = option(2, ge=1)
    start: int | None = option(None, ge=0)
    fuse: bool = True

    def validate(self) -> None:
        if self.layers is not None:
            derived = {"pairs": len(self.layers) // 2, "start": self.layers[0] if self.layers else None}
            clash = [
                f"{k}={getattr(self, k)!r}"
                for k, v in derived.items()
                if self.given(k) and getattr(self, k) != v
            ]
            if self.given("version"):  # a copy (dataclasses.replace) or a saved config: `layers` wins
                clash = []
            if clash:
                raise ConfigError(
                    f"layer-parallel: `layers={self.layers}` conflicts with {', '.join(clash)} "
                    f"(`layers` means pairs={derived['pairs']}, start={derived['start']}); give either "
                    f"`layers` or `pairs`/`start`"
                )
            if (
                not self.layers
                or len(self.layers) % 2
                or self.layers != list(range(self.layers[0], self.layers[0] + len(self.layers)))
            ):
                raise ConfigError(
                    f"layer-parallel: `layers` must be a contiguous range of even length, got {self.layers}"
                )
            self.pairs, self.start = len(self.layers) // 2, self.layers[0]
        self.layers = None  # derived from (pairs, start); stored that way

    def resolve(self, num_layers: int) -> list[int]:
        """The paired layer indices for a model with ``num_layers`` layers (raises if they don't fit)."""
        start = num_layers - 1 - 2 * self.pairs if self.start is None else self.start
        if 2 * self.pairs > num_layers:
            raise ConfigError(
                f"layer-parallel: `pairs={self.pairs}` pairs ({2 * self.pairs} layers) do not fit in a model "
                f"with {num_layers} layers; `pairs` must be in 1..{num_layers // 2}"
                + ("" if num_layers >= 2 else " (a model needs at least 2 layers to pair)")
            )
        if start < 0 or start + 2 * self.pairs > num_layers:
            raise ConfigError(
                f"layer-parallel: {self.pairs} pairs starting at layer {start} do not fit in a model with "
                f"{num_layers} layers (at most {num_layers // 2} pairs; start in 0..{num_layers - 2 * self.pairs})"
            )
        return list(range(start, start + 2 * self.pairs))

    def resolved(self, num_layers: int) -> LayerParallelConfig:
        return self.replace(start=self.resolve(num_layers)[0])
