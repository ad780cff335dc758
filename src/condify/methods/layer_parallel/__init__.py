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
            "quick": (
                {"pairs": 1},
                {
                    "sweep_batches": 1,
                    "finetune_steps": 2,
                    "num_train_batches": 2,
                    "batch_size": 2,
                    "seq_len": 128,
                },
            ),
            "cpu": (
                {"pairs": 2},
                {
                    "starts": list(range(1, 64, 2)),  # every other start; those that do not fit are skipped
                    "sweep_batches": 1,
                    "finetune_steps": 30,
                    "lr": 1e-4,
                    "num_train_batches": 30,
                    "batch_size": 2,
                    "seq_len": 256,
                },
            ),
            "long": (
                {"pairs": 4},
                {
                    "sweep_batches": 4,
                    "finetune_steps": 2000,
                    "lr": 1e-4,
                    "num_train_batches": 2000,
                    "batch_size": 8,
                    "seq_len": 512,
                },
            ),
        },
    )
)

__all__ = ["LayerParallelConfig"]
