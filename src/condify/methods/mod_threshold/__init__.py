"""mod-threshold: per-token routers that let tokens skip whole decoder layers (MoDification, arXiv 2410.14268)."""

from __future__ import annotations

from ... import registry
from ...registry import Data, Recipe
from .calibrate import CapacityHold, ModThresholdCalibration, calibrate
from .config import ModThresholdConfig
from .routing import at_capacity, fit_biases, keep_rates, layer_sensitivity, least_sensitive_layers
from .transform import attach, patch_target, remove, targets

RECIPES = {
    "quick": Recipe({"capacity": 0.75}, {"steps": 2, "router_steps": 1, "fit_batches": 2}, Data(1, 64, 3)),
    # the README main job: ~3 minutes of training on 2 cores (benchmarks/results/mod_threshold.md)
    "cpu": Recipe({"capacity": 0.75}, {"steps": 24, "router_steps": 4}, Data(2, 256, 31)),
    "long": Recipe({"capacity": 0.5}, {"steps": 2000, "router_steps": 200, "lr": 1e-4}, Data(8, 512, 2200)),
}

registry.register(
    registry.Method(
        name="mod-threshold",
        description="tokens skip whole decoder layers by a learned threshold router; ragged KV cache",
        config_cls=ModThresholdConfig,
        targets=targets,
        patch=patch_target,
        attach=attach,
        remove=remove,
        calibrate=calibrate,
        options=ModThresholdCalibration,
        recipes=RECIPES,
        training=CapacityHold,
        training_options=("capacity", "bias_momentum"),
    )
)

__all__ = [
    "ModThresholdCalibration",
    "ModThresholdConfig",
    "at_capacity",
    "fit_biases",
    "keep_rates",
    "layer_sensitivity",
    "least_sensitive_layers",
]
