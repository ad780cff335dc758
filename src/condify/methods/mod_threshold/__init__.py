"""mod-threshold: per-token routers that let tokens skip whole decoder layers (MoDification, arXiv 2410.14268)."""

from __future__ import annotations

from ... import registry
from .calibrate import calibrate, keep_rates, layer_sensitivity, least_sensitive_layers
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
            # calibrate options; batch_size / seq_len / num_train_batches shape the training text
            "quick": (
                {"capacity": 0.75},
                {
                    "steps": 2,
                    "router_steps": 1,
                    "fit_batches": 2,
                    "batch_size": 1,
                    "seq_len": 64,
                    "num_train_batches": 2,
                },
            ),
            # the README main job: ~3 minutes of training on 2 cores (benchmarks/results/mod_threshold.md)
            "cpu": (
                {"capacity": 0.75},
                {"steps": 24, "router_steps": 4, "batch_size": 2, "seq_len": 256, "num_train_batches": 28},
            ),
            "long": (
                {"capacity": 0.5},
                {
                    "steps": 2000,
                    "router_steps": 200,
                    "lr": 1e-4,
                    "batch_size": 8,
                    "seq_len": 512,
                    "num_train_batches": 2000,
                },
            ),
        },
    )
)

__all__ = ["ModThresholdConfig", "keep_rates", "layer_sensitivity", "least_sensitive_layers"]
