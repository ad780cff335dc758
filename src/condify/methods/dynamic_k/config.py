"""Options of dynamic-k (D2DMoE): expert layout, router width, selection threshold."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from ...config import ConfigError, MethodConfig, option

CLUSTERINGS = ("gate", "coactivation")
ACTIVATIONS = (None, "relu")


@dataclasses.dataclass
class DynamicKConfig(MethodConfig):
    """dynamic-k options.

    - ``expert_size``: neurons per expert (must divide the MLP intermediate size); 1 = neuron level.
    - ``tau``: selection threshold; expert e runs iff ``router_e >= tau * max router`` (at least one).
      0 is exactly dense. Calibration with ``target_sparsity`` replaces it by per-layer thresholds,
      stored as buffers (``expert_layout.tau``) so they are saved with the weights.
    - ``target_sparsity``: fraction of expert compute to skip on calibration data (``calibrate`` sets
      the thresholds); ``None`` keeps ``tau``.
    - ``router_width``: hidden width of the router ``Linear(d, w) -> ReLU -> Linear(w, E) -> abs``.
    - ``clustering``: how neurons are grouped into experts: balanced k-means on co-activation statistics
      (``"coactivation"``, the default, done by ``calibrate``; ``modify`` keeps the original order until
      then) or on the normalised gate (up for non-GLU) rows (``"gate"``, data-free, done by ``modify``).
      Measured on SmolLM2 with 16-neuron experts, oracle selection: x4.6 vs x5.7 perplexity at 50 %
      executed, x1.57 vs x1.68 at 75 % (DESIGN.md notes), and every recipe uses it.
    - ``activation``: ``None`` keeps the model's activation; ``"relu"`` computes the MLP with ReLU
      (set by ``calibrate(sparsify=...)`` when the ReLU swap is requested, saved in the config).
    - ``attention``: also convert the attention projections (q/k/v/o, or fused qkv/o): each becomes a
      ``Linear -> ReLU -> Linear`` MLP (initialised as the best rank-``h/2`` approximation of the
      linear map, then distilled by ``calibrate``) and is MoE-fied like the FFNs.
    - ``attention_width``: hidden width of those MLPs as a multiple of the parameter-matched width
      ``d_in * d_out / (d_in + d_out)`` (1.0: as many weights and FLOPs as the linear map; 4.0 on a
      square projection: exact at init), rounded up to a multiple of ``attention_expert_size``.
    - ``attention_expert_size``: neurons per attention expert (default: ``expert_size``).
    - ``layers``: decoder layers whose MLP is converted (default: all).
    """

    method: ClassVar[str] = "dynamic-k"

    expert_size: int = option(32, ge=1)
    tau: float = option(0.0, ge=0.0, le=1.0)
    target_sparsity: float | None = option(None, ge=0.0, lt=1.0)
    router_width: int = option(128, ge=1)
    clustering: str = option("coactivation", choices=CLUSTERINGS)
    activation: str | None = option(None, choices=ACTIVATIONS)
    attention: bool = False
    attention_width: float = option(1.0, gt=0.0, le=16.0)
    attention_expert_size: int | None = option(None, ge=1)

    def validate(self) -> None:
        if not self.attention and not self.given("version"):  # a saved config is read as it was
            unused = [f"{k}={getattr(self, k)!r}" for k, d in (("attention_width", 1.0), ("attention_expert_size", None))
                      if self.given(k) and getattr(self, k) != d]  # fmt: skip
            if unused:
                raise ConfigError(
                    f"dynamic-k: {', '.join(unused)} only applies with `attention=True` (got attention=False); "
                    f"set attention=True or drop the option"
                )

    def projection_width(self, d_in: int, d_out: int) -> tuple[int, int]:
        """(hidden width, expert size) of the MLP replacing a ``d_in -> d_out`` projection."""
        s = self.attention_expert_size or self.expert_size
        h = self.attention_width * d_in * d_out / (d_in + d_out)
        return max(s, s * math.ceil(h / s - 1e-9)), s
