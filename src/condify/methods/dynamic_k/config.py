"""Options of dynamic-k (D2DMoE): expert layout, router width, selection threshold."""

from __future__ import annotations

import dataclasses
import math
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

    expert_size: int = 32
    tau: float = 0.0
    target_sparsity: float | None = None
    router_width: int = 128
    clustering: str = "gate"
    activation: str | None = None
    attention: bool = False
    attention_width: float = 1.0
    attention_expert_size: int | None = None

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
        in_range("attention_width", self.attention_width, 0.0, 16.0, lo_open=True)
        s = self.attention_expert_size
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 1):
            raise ConfigError(
                f"dynamic-k: `attention_expert_size` must be a positive integer or None, got {s!r}"
            )

    def projection_width(self, d_in: int, d_out: int) -> tuple[int, int]:
        """(hidden width, expert size) of the MLP replacing a ``d_in -> d_out`` projection."""
        s = self.attention_expert_size or self.expert_size
        h = self.attention_width * d_in * d_out / (d_in + d_out)
        return max(s, s * math.ceil(h / s - 1e-9)), s
