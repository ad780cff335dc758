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
    )
)

__all__ = ["LayerParallelConfig"]
