"""Options of lte (Learn To be Efficient): expert layout, selection threshold, router init."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from ...config import ConfigError, MethodConfig, option

STAGES = (None, "soft", "hard")


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@dataclasses.dataclass
class LteConfig(MethodConfig):
    """lte options.

    - ``expert_size``: neurons per expert (must divide the MLP intermediate size). Experts are balanced
      k-means clusters of the gate rows (GLU MLPs; up rows otherwise), made contiguous in place by
      ``modify`` (the permutation is recorded, so ``unmodify`` is exact).
    - ``threshold``: expert e runs for a token iff ``sigmoid(router(x))_e >= threshold``, in (0, 1).
      A token may select no expert (its FFN then adds only the down bias, if any): that is the rule the
      router is trained for, and forcing one expert would add compute the router did not ask for.
      ``calibrate`` may move each layer's threshold (``expert_layout.tau``, saved with the weights) so
      the executed fraction on its data matches ``target_sparsity``.
    - ``init_bias``: the routers start at weight 0 and this bias, so every score is
      ``sigmoid(init_bias)`` (0.982 for 4.0) >= ``threshold``: every expert runs, the model is exactly
      dense. The soft mode (training) weights expert e by ``s_e / sigmoid(init_bias)``, i.e. the init
      scale is folded out, so it is exactly dense at init too; must satisfy ``sigmoid(init_bias) > threshold``.
    - ``target_sparsity``: fraction of expert compute skipped, recorded by ``calibrate``.
    - ``calibrated``: the last stage ``calibrate`` ran (None, ``"soft"``, ``"hard"``); set by calibrate
      (``stage="hard"`` needs trained routers).
    - ``layers``: decoder layers whose MLP is converted (default: all).
    """

    method: ClassVar[str] = "lte"

    expert_size: int = option(32, ge=1)
    threshold: float = option(0.5, gt=0.0, lt=1.0)
    init_bias: float = option(4.0, ge=-30.0, le=30.0)
    target_sparsity: float | None = option(None, ge=0.0, lt=1.0)
    calibrated: str | None = option(None, choices=STAGES)

    def validate(self) -> None:
        if sigmoid(self.init_bias) <= self.threshold:
            raise ConfigError(
                f"lte: `init_bias={self.init_bias}` gives scores sigmoid(init_bias)={sigmoid(self.init_bias):.3f} "
                f"<= threshold={self.threshold}, so the model would not be dense at init; raise init_bias "
                f"(e.g. {math.log(self.threshold / (1 - self.threshold)) + 4:.1f}) or lower the threshold"
            )
