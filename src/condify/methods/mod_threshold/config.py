"""Options of mod-threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import ConfigError, MethodConfig, option


@dataclass
class ModThresholdConfig(MethodConfig):
    """Per-token threshold routing over whole decoder layers (MoDification).

    - ``layers``: gated layer indices; default every other layer from layer 3, never the last two
      (``3, 5, ...`` below ``num_layers - 2``; ``1, 3, ...`` below ``num_layers - 1`` for models of fewer
      than 8 layers). Layer 1 and the last layers are where skipping costs most: on SmolLM2-135M,
      gating layer 1 alone at capacity 0.5 costs 1.72 nats/token of KL to dense, layer 28 0.52, the
      other layers 0.05-0.22; every other layer from 1 vs from 3 is x4.3 vs x1.6 perplexity at
      capacity 0.75, training-free (``benchmarks/results/mod_threshold.md``). :func:`.layer_sensitivity`
      measures this for any model and :func:`.least_sensitive_layers` picks a data-driven set.
    - ``auto_layers``: with ``layers=None`` (the default set above; ``auto_layers=None`` means exactly
      that), the first ``calibrate`` on untrained routers replaces the set by the same number of layers
      that cost least to gate alone on its data (:func:`.layer_sensitivity` at the calibrated capacity)
      and records them (``auto_layers`` becomes False). The fixed rule does not carry over to every
      model: on Gemma-3-270M it gates the full-attention layer 5 and layer 3 (x16.7 training-free at
      capacity 0.75, chosen x2.29; ``benchmarks/results/frontier-gemma-python-docs.md``). ``False``
      keeps the rule's set; routers trained before the first calibrate (e.g. in your own loop) keep it too.
    - ``threshold``: a token takes a gated layer iff ``sigmoid(w·h + b) >= threshold``; in (0, 1).
    - ``capacity``: the target keep-rate in (0, 1] that :func:`calibrate` trains towards.
    - ``mode``: ``"gather"`` (inference runs kept tokens only, ragged per sequence) or ``"mask"``
      (computes every token and masks the updates; the correctness oracle). Training always uses
      the masked form, since skipped tokens need a gradient for their router.
    - ``init_bias``: router bias at init (weight 0), so that every token is kept: dense at init.
    - ``sink_tokens``: the first ``sink_tokens`` real (non-padding) tokens of each sequence always take
      every layer (attention sinks; default 4: on SmolLM2 at capacity 0.75 this halves the
      training-free perplexity cost).
    - ``debug_checks``: raise on NaN/inf layer inputs instead of propagating them.
    """

    method: ClassVar[str] = "mod-threshold"
    VERSION: ClassVar[int] = 3  # 2: default layers from 3 (was 1), sink_tokens 4 (was 0); 3: auto_layers

    threshold: float = option(0.5, gt=0.0, lt=1.0)
    capacity: float = option(0.5, gt=0.0, le=1.0)
    mode: str = option("gather", choices=("gather", "mask"))
    init_bias: float = option(5.0, ge=-100.0, le=100.0)
    sink_tokens: int = option(4, ge=0, le=1 << 20)
    auto_layers: bool | None = None
    debug_checks: bool = False

    def validate(self) -> None:
        if self.layers is not None and not self.layers:
            raise ConfigError("mod-threshold: `layers` is empty; gate at least one layer or pass None")

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version < 2:  # version 1 had no sink tokens
            data = {"sink_tokens": 0, **data}
        return {"auto_layers": False, **data} if version < 3 else data  # earlier sets were fixed

    def resolve(self, num_layers: int) -> list[int]:
        """The gated layer indices for a model with ``num_layers`` layers."""
        if self.layers is not None:
            return list(self.layers)
        if num_layers < 8 or self.version < 2:  # a version-1 checkpoint keeps its default layers
            out = list(range(1, num_layers - 1, 2))
        else:
            out = list(range(3, num_layers - 2, 2))
        self.check_selection(out, num_layers)  # 1-2-layer models: the default gates nothing
        return out

    def resolved(self, num_layers: int) -> ModThresholdConfig:
        auto = self.layers is None if self.auto_layers is None else self.auto_layers
        return self.replace(layers=self.resolve(num_layers), auto_layers=auto)
