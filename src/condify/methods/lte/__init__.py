"""lte: dense FFNs -> experts with sigmoid routers, learned structured sparsity (LTE, arXiv 2402.06126).

``modify`` groups MLP neurons into equal-size experts (balanced k-means on the gate rows, contiguous
blocks permuted in place: dynamic-k's machinery) and adds a ``router`` per MLP (``Linear(d, E)`` + sigmoid)
that starts at "keep everything" (exactly dense). ``calibrate(target_sparsity=...)`` trains the routers
soft with the model frozen (eta driven to the target), fits the threshold, then fine-tunes the model
under the hard selection ``s >= threshold`` (see :mod:`.calibrate`). Inference runs the selected experts
through ``condify.ops.expert_mlp``.
"""

from __future__ import annotations

from ... import registry
from ...registry import Data, Recipe
from .calibrate import LteCalibration, LteTraining, calibrate
from .config import LteConfig
from .modules import mode, set_mode, set_threshold
from .transform import patch_target, remove, targets

# Budgets. Each holds out 10 % of its batches; by default the routers make one pass over the rest and
# the hard fine-tune 1-4 (condify.training.recovery_steps) at two rates; these recipes pin their steps and one rate.
# "quick": CI smoke (seconds); "cpu": the setting of benchmarks/results/lte.md (20 soft + 40 hard steps of
# 2 x 128 tokens = 15.4k tokens: 15 minutes wall on one thread of the shared, oversubscribed 2-core machine
# it was measured on, with the held-out evaluations);
# "long": GPU-sized (not run: no GPU was lent).
RECIPES = {
    "quick": Recipe({"expert_size": 32}, {"target_sparsity": 0.5, "soft_steps": 2, "hard_steps": 2}, Data(2, 64, 4)),
    "cpu": Recipe(
        {"expert_size": 32}, {"target_sparsity": 0.5, "soft_steps": 20, "hard_steps": 40, "hard_lr_choice": None},
        Data(2, 128, 44),
    ),
    "long": Recipe({"expert_size": 32}, {"target_sparsity": 0.5, "hard_lr_choice": None}, Data(8, 512, 2200)),
}  # fmt: skip

registry.register(
    registry.Method(
        name="lte",
        description="FFNs -> experts with sigmoid routers (Learn To be Efficient): soft router training, hard fine-tune",
        config_cls=LteConfig,
        targets=targets,
        patch=patch_target,
        remove=remove,
        calibrate=calibrate,
        options=LteCalibration,
        recipes=RECIPES,
        training=LteTraining,
        training_options=("target_sparsity", "eta", "eta_gain", "separation", "hold_target"),
    )
)

__all__ = ["LteCalibration", "LteConfig", "mode", "set_mode", "set_threshold"]
