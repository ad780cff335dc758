"""dynamic-k: dense FFNs -> dynamic-k mixtures of experts (D2DMoE, arXiv 2310.04361).

``modify`` groups MLP neurons into equal-size experts (contiguous blocks, permuted in place) and
adds a norm-regressing ``router`` per MLP; with ``attention=True`` every attention projection gets a
``Linear -> ReLU -> Linear`` replacement that is MoE-fied the same way. ``calibrate`` distils the
projections, sparsifies activations, clusters, trains the routers, sets thresholds and orders the
experts (see :mod:`.calibrate`). Runtime helpers: ``mode(model, "oracle")``
selects by true expert norms (router error vs layout error), ``set_tau`` changes thresholds,
``track_executed`` counts the executed expert compute.

Expert size (measured on SmolLM2, ``benchmarks/results/dynamic_k*.md``): quality falls as experts grow
(oracle at ~57 % executed: x2.2 perplexity with 32 neurons, x3.2 with 128), while the CPU decode path
(``condify.ops.expert_mlp``, one set of small matmuls per run of consecutive selected experts) pays a
fixed cost per run. The default is 32, for quality; ordering the experts (``calibrate``) keeps the runs
per token low.
"""

from __future__ import annotations

from ... import registry
from ...registry import Data, Recipe
from .calibrate import DynamicKCalibration, calibrate
from .config import DynamicKConfig
from .modules import executed_fraction, mode, set_mode, set_tau, track_executed
from .transform import patch_target, remove, targets

# Budgets. "quick": CI smoke; "cpu": the README main job on a 2-core CPU (~6 minutes on a quiet
# machine); "long": GPU-sized (not run: no GPU was lent). All keep the model's activation and rely on
# the routed fine-tune (stage 5): on SmolLM2 it beat the ReLU swap by far at equal tokens (50 %
# executed: x1.21 after 25.6k tokens vs x2.61 after 31k tokens of ReLU + Hoyer;
# benchmarks/results/dynamic_k_adapt.md, dynamic_k.md). Each holds out 10 % of its batches.
RECIPES = {
    "quick": Recipe(
        {"expert_size": 64, "clustering": "gate"},
        {"router_steps": 50, "router_tokens": 1024, "target_sparsity": 0.5},
        Data(2, 128, 4),
    ),
    "cpu": Recipe(
        {"expert_size": 32, "clustering": "coactivation"},
        {"router_steps": 300, "router_tokens": 4096, "target_sparsity": 0.5, "adapt_steps": 48,
         "adapt_lr_choice": None},  # one pass at one rate, as measured
        Data(2, 128, 53),
    ),
    "long": Recipe(
        {"expert_size": 32, "clustering": "coactivation"},
        {
            "router_steps": 3000, "router_tokens": 65536, "coactivation_tokens": 8192, "target_sparsity": 0.5,
            "adapt_steps": 2000, "adapt_lr": 1e-4, "adapt_lr_choice": None,
        },
        Data(8, 512, 2200),
    ),
}  # fmt: skip

registry.register(
    registry.Method(
        name="dynamic-k",
        description="FFNs -> dynamic-k experts with norm-regressing routers (D2DMoE); sparsify, cluster, route",
        config_cls=DynamicKConfig,
        targets=targets,
        patch=patch_target,
        remove=remove,
        calibrate=calibrate,
        options=DynamicKCalibration,
        recipes=RECIPES,
    )
)

__all__ = [
    "DynamicKCalibration",
    "DynamicKConfig",
    "executed_fraction",
    "mode",
    "set_mode",
    "set_tau",
    "track_executed",
]
