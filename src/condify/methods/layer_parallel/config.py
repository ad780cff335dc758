"""Options of layer-parallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigError, MethodConfig, option


@dataclass
class LayerParallelConfig(MethodConfig):
    """Which pairs of adjacent layers run in parallel.

    Give ``layers`` (pairs of adjacent layers, e.g. ``[3, 4, 9, 10]`` pairs (3, 4) and (9, 10); the
    pairs need not touch), or ``pairs`` with an optional ``start`` for one contiguous range
    (start, start+1), (start+2, start+3), ... (default: the pairs end just before the last layer;
    ``calibrate`` chooses the pairs by measured sensitivity). ``fuse`` runs each pair as one set of
    wide GEMMs where the architecture allows it (pairs whose layers share one attention type).
    """

    method: ClassVar[str] = "layer-parallel"

    pairs: int = option(2, ge=1)
    start: int | None = option(None, ge=0)
    fuse: bool = True

    def validate(self) -> None:
        if self.layers is None:
            return
        ls = self.layers
        if not ls or len(ls) % 2 or any(ls[i + 1] != ls[i] + 1 for i in range(0, len(ls), 2)):
            raise ConfigError(
                f"layer-parallel: `layers` must list pairs of adjacent layers (e.g. [3, 4, 9, 10]), got {ls}"
            )
        contiguous = ls == list(range(ls[0], ls[0] + len(ls)))
        derived = {"pairs": len(ls) // 2, "start": ls[0] if contiguous else None}
        clash = [
            f"{k}={getattr(self, k)!r}" for k, v in derived.items() if self.given(k) and getattr(self, k) != v
        ]
        if clash and not self.given("version"):  # copies and saved configs carry every field
            raise ConfigError(
                f"layer-parallel: `layers={ls}` conflicts with {', '.join(clash)} (`layers` means "
                f"pairs={derived['pairs']}, start={derived['start']}); give either `layers` or `pairs`/`start`"
            )
        self.pairs = derived["pairs"]
        if contiguous:  # one contiguous range: stored as (pairs, start)
            self.start, self.layers = ls[0], None
        else:
            self.start = None

    def resolve(self, num_layers: int) -> list[int]:
        """The paired layer indices for a model with ``num_layers`` layers (raises if they don't fit)."""
        if self.layers is not None:
            if self.layers[-1] >= num_layers:
                raise ConfigError(
                    f"layer-parallel: layers {self.layers} do not fit in a model with {num_layers} layers"
                )
            return list(self.layers)
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
        return self if self.layers is not None else self.replace(start=self.resolve(num_layers)[0])
