"""Options of mot (Mixture of Tokens): groups, experts, temperature, the stage (MoT or transitioned MoE)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...config import ConfigError, MethodConfig, option

STAGES = ("mot", "moe")
CLUSTERINGS = ("gate", "none")
ROUTER_INITS = ("centroid", "zeros")


@dataclasses.dataclass
class MoTConfig(MethodConfig):
    """mot options.

    - ``group_size`` (G): a group is the tokens at the same position across G consecutive sequences of
      the batch; in the ``"mot"`` stage the last ``B % G`` sequences of a batch form a smaller group
      (alone, a sequence runs the dense MLP), and ``calibrate`` regroups batches into full groups.
    - ``num_experts`` (E): experts per converted MLP; expert e is the contiguous block of I/E neurons
      ``[e*I/E, (e+1)*I/E)`` of the dense MLP (after the ``clustering`` permutation, done in place).
    - ``temperature``: initial mixing temperature t (the softmax over the group is taken of
      ``x . W_c[:, e] / t``); stored per layer as the buffer ``router.temperature`` (saved), which
      ``calibrate(temperature_end=...)`` anneals. t -> 0 makes each expert take only the highest-scoring
      token of its group (expert choice, one token per expert and group).
    - ``top_k``: experts per token after the transition to a token-choice MoE (default
      ``max(1, E // G)``: the same executed expert compute per token as MoT, a fraction 1/G of the MLP).
    - ``clustering``: ``"gate"``: balanced k-means on the normalised gate (up for non-GLU) rows before
      slicing (a permutation of neurons: the dense function is unchanged); ``"none"``: original order.
    - ``router_init``: controller init: ``"centroid"`` (each expert's mean gate row, unit norm, scaled
      by ``router_scale``) or ``"zeros"`` (uniform mixing).
    - ``stage``: ``"mot"`` (continuous mixing, batch-grouped) or ``"moe"`` (transitioned: token-choice
      top-k, any batch size). Set by ``calibrate(stage="transition")``; saved, so loading restores it.
    - ``layers``: decoder layers converted (default: the second half of the blocks).
    """

    method: ClassVar[str] = "mot"

    group_size: int = option(4, ge=1)
    num_experts: int = option(16, ge=1)
    temperature: float = option(1.0, gt=0.0)
    top_k: int | None = option(None, ge=1)
    clustering: str = option("gate", choices=CLUSTERINGS)
    router_init: str = option("centroid", choices=ROUTER_INITS)
    router_scale: float = option(1.0, ge=0.0)
    stage: str = option("mot", choices=STAGES)

    def validate(self) -> None:
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ConfigError(f"mot: `top_k={self.top_k}` must be <= `num_experts={self.num_experts}`")

    @property
    def k(self) -> int:
        """Experts per token after the transition."""
        return self.top_k if self.top_k is not None else max(1, self.num_experts // self.group_size)

    def resolved(self, num_layers: int) -> MoTConfig:
        layers = self.layers if self.layers is not None else list(range(num_layers // 2, num_layers))
        return self.replace(layers=layers, top_k=self.k)
