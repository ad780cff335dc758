"""Options of mod-threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigError, MethodConfig, in_range


@dataclass
class ModThresholdConfig(MethodConfig):
    """Per-token threshold routing over whole decoder layers (MoDification).

    - ``layers``: gated layer indices; default every other layer, never the first or the last
      (``1, 3, 5, ...`` below ``num_layers - 1``).
    - ``threshold``: a token takes a gated layer iff ``sigmoid(w·h + b) >= threshold``; in (0, 1).
    - ``capacity``: the target keep-rate in (0, 1] that :func:`calibrate` trains towards.
    - ``mode``: ``"gather"`` (inference runs kept tokens only, ragged per sequence) or ``"mask"``
      (computes every token and masks the updates; the correctness oracle). Training always uses
      the masked form, since skipped tokens need a gradient for their router.
    - ``init_bias``: router bias at init (weight 0), so that every token is kept: dense at init.
    - ``sink_tokens``: tokens at positions ``< sink_tokens`` always take every layer (attention sinks).
    - ``debug_checks``: raise on NaN/inf layer inputs instead of propagating them.
    """

    method: ClassVar[str] = "mod-threshold"

    threshold: float = 0.5
    capacity: float = 0.5
    mode: str = "gather"
    init_bias: float = 5.0
    sink_tokens: int = 0
    debug_checks: bool = False

    def validate(self) -> None:
        in_range("threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        in_range("capacity", self.capacity, 0.0, 1.0, lo_open=True)
        if self.mode not in ("gather", "mask"):
            raise ConfigError(f"mod-threshold: `mode` must be 'gather' or 'mask', got {self.mode!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ConfigError(
                f"mod-threshold: `sink_tokens` must be an integer >= 0, got {self.sink_tokens!r}"
            )
        if self.layers is not None and not self.layers:
            raise ConfigError("mod-threshold: `layers` is empty; gate at least one layer or pass None")

    def resolve(self, num_layers: int) -> list[int]:
        """The gated layer indices for a model with ``num_layers`` layers."""
        if self.layers is not None:
            return list(self.layers)
        return list(range(1, num_layers - 1, 2))
