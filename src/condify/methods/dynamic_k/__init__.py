"""dynamic-k: dense FFNs -> dynamic-k mixtures of experts (D2DMoE, arXiv 2310.04361).

``modify`` groups MLP neurons into equal-size experts (contiguous blocks, permuted in place) and
adds a norm-regressing router per MLP; ``calibrate`` sparsifies activations, clusters, trains the
routers and sets thresholds. See :mod:`.calibrate` for the steps and budgets.
"""

from __future__ import annotations

from ... import registry
from .calibrate import calibrate
from .config import DynamicKConfig
from .modules import executed_fraction, mode, set_mode, set_tau, track_executed
from .transform import apply, plan, remove

registry.register(
    registry.Method(
        name="dynamic-k",
        description="FFNs -> dynamic-k experts with norm-regressing routers (D2DMoE); sparsify, cluster, route",
        config_cls=DynamicKConfig,
        plan=plan,
        apply=apply,
        remove=remove,
        calibrate=calibrate,
        recipes={},
    )
)

__all__ = ["DynamicKConfig", "executed_fraction", "mode", "set_mode", "set_tau", "track_executed"]
