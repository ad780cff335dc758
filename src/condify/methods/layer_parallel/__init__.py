"""layer-parallel: pairs of consecutive decoder layers evaluated in parallel (arXiv 2502.02790)."""

from __future__ import annotations

from ... import registry
from ...registry import Data, Recipe
from .calibrate import LayerParallelCalibration, calibrate
from .config import LayerParallelConfig
from .transform import patch_target, remove_pairs, targets

RECIPES = {
    "quick": Recipe({"pairs": 1}, {"sweep_batches": 1, "finetune_steps": 2}, Data(2, 128, 3)),
    "cpu": Recipe(
        {"pairs": 2},
        # every other start; those that do not fit are skipped
        {"starts": list(range(1, 64, 2)), "sweep_batches": 1, "finetune_steps": 30, "lr": 1e-4},
        Data(2, 256, 34),
    ),
    "long": Recipe(
        {"pairs": 4}, {"sweep_batches": 4, "finetune_steps": 2000, "lr": 1e-4}, Data(8, 512, 2200)
    ),
}

registry.register(
    registry.Method(
        name="layer-parallel",
        description="run pairs of consecutive layers in parallel, fused into wider GEMMs (no new weights)",
        config_cls=LayerParallelConfig,
        targets=targets,
        patch=patch_target,
        remove=remove_pairs,
        calibrate=calibrate,
        options=LayerParallelCalibration,
        recipes=RECIPES,
    )
)

__all__ = ["LayerParallelCalibration", "LayerParallelConfig"]
