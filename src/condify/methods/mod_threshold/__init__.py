"""mod-threshold: per-token routers that let tokens skip whole decoder layers (MoDification, arXiv 2410.14268)."""

from __future__ import annotations

from ... import registry
from .calibrate import calibrate, keep_rates
from .config import ModThresholdConfig
from .transform import apply, plan, remove

registry.register(
    registry.Method(
        name="mod-threshold",
        description="tokens skip whole decoder layers by a learned threshold router; ragged KV cache",
        config_cls=ModThresholdConfig,
        plan=plan,
        apply=apply,
        remove=remove,
        calibrate=calibrate,
        recipes={
            "quick": ({"capacity": 0.75}, {"steps": 4, "router_steps": 2}),
            "cpu": ({"capacity": 0.5}, {"steps": 120, "router_steps": 20}),
            "long": ({"capacity": 0.5}, {"steps": 2000, "router_steps": 100}),
        },
    )
)

__all__ = ["ModThresholdConfig", "keep_rates"]
