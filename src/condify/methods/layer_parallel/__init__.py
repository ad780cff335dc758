"""layer-parallel: pairs of consecutive decoder layers evaluated in parallel (arXiv 2502.02790)."""

from __future__ import annotations

from ... import registry
from .calibrate import calibrate
from .config import LayerParallelConfig
from .transform import apply, plan

registry.register(
    registry.Method(
        name="layer-parallel",
        description="run pairs of consecutive layers in parallel, fused into wider GEMMs (no new weights)",
        config_cls=LayerParallelConfig,
        plan=plan,
        apply=apply,
        calibrate=calibrate,
        recipes={
            "quick": ({"pairs": 1}, {"starts": [20, 24], "sweep_batches": 1}),
            "cpu": ({"pairs": 2}, {"starts": list(range(12, 26, 2)), "finetune_steps": 60, "lr": 1e-4}),
            "long": ({"pairs": 4}, {"finetune_steps": 1000, "lr": 1e-4}),
        },
    )
)

__all__ = ["LayerParallelConfig"]
