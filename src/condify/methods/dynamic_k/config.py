"""Options of dynamic-k (D2DMoE): expert layout, router width, selection threshold."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, MethodConfig, in_range

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
    - ``clustering``: how neurons are grouped into experts: balanced k-means on the normalised gate
      (up for non-GLU) rows (``"gate"``, data-free, done by ``modify``) or on co-activation statistics
      (``"coactivation"``, done by ``calibrate``; ``modify`` keeps the original order until then).
    - ``activation``: ``None`` keeps the model's activation; ``"relu"`` computes the MLP with ReLU
      (set by ``calibrate(sparsify=...)`` when the ReLU swap is requested, saved in the config).
    - ``attention``: MoE-fied attention projections: not implemented yet (raises).
    - ``layers``: decoder layers whose MLP is converted (default: all).
    """

    method: ClassVar[str] = "dynamic-k"

    expert_size: int = 32
    tau: float = 0.0
    target_sparsity: float | None = None
    router_width: int = 128
    clustering: str = "gate"
    activation: str | None = None
    attention: bool = False

    def validate(self) -> None:
        if (
            not isinstance(self.expert_size, int)
            or isinstance(self.expert_size, bool)
            or self.expert_size < 1
        ):
            raise ConfigError(
                f"dynamic-k: `expert_size` must be a positive integer, got {self.expert_size!r}"
            )
        in_range("tau", self.tau, 0.0, 1.0)
        if self.target_sparsity is not None:
            in_range("target_sparsity", self.target_sparsity, 0.0, 1.0, hi_open=True)
        if not isinstance(self.router_width, int) or self.router_width < 1:
            raise ConfigError(
                f"dynamic-k: `router_width` must be a positive integer, got {self.router_width!r}"
            )
        if self.clustering not in CLUSTERINGS:
            raise ConfigError(
                f"dynamic-k: `clustering` must be one of {CLUSTERINGS}, got {self.clustering!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"dynamic-k: `activation` must be None or 'relu', got {self.activation!r}")
        if self.attention:
            raise ConfigError(
                "dynamic-k: `attention=True` (MoE-fied attention projections) is not implemented yet; "
                "use attention=False (FFNs only)"
            )
