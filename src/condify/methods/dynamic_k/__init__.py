"""dynamic-k: dense FFNs -> dynamic-k mixtures of experts (D2DMoE, arXiv 2310.04361).

``modify`` groups MLP neurons into equal-size experts (contiguous blocks, permuted in place) and
adds a norm-regressing ``router`` per MLP; with ``attention=True`` every attention projection gets a
``Linear -> ReLU -> Linear`` replacement that is MoE-fied the same way. ``calibrate`` distils the
projections, sparsifies activations, clusters, trains the routers, sets thresholds and orders the
experts (see :mod:`.calibrate`). Runtime helpers: ``mode(model, "oracle")``
selects by true expert norms (router error vs layout error), ``set_tau`` changes thresholds,
``track_executed`` counts the executed expert compute.

Expert size (measured on SmolLM2, ``benchmarks/results/dynamic_k.md``): quality falls as experts grow
(oracle at ~57 % executed: x2.2 perplexity with 32 neurons, x3.2 with 128), while the CPU decode path
(``condify.ops.expert_mlp``, one set of small matmuls per run of consecutive selected experts) only
gains with few runs, i.e. large experts (>= 256). The default is 32, for quality.
"""

from __future__ import annotations

from ... import registry
from .calibrate import calibrate
from .config import DynamicKConfig
from .modules import executed_fraction, mode, set_mode, set_tau, track_executed
from .transform import apply, plan, remove

# Budgets (modify options, calibrate options). "quick": CI smoke; "cpu": the README main job on a 2-core
# CPU (a few minutes on a quiet machine); "long": GPU-sized. See benchmarks/results/dynamic_k.md for what
# each stage buys at these budgets. "cpu" skips sparsification and runs 75 % of expert compute: a
# ReLU swap needs far more fine-tuning than a few CPU minutes give (measured there), and without it
# 50 % executed costs x2-4 perplexity on SmolLM2.
RECIPES = {
    "quick": (
        {"expert_size": 64, "clustering": "gate"},
        {"router_steps": 50, "router_tokens": 1024, "target_sparsity": 0.5, "num_train_batches": 3, "batch_size": 2, "seq_len": 128},
    ),
    "cpu": (
        {"expert_size": 32, "clustering": "coactivation"},
        {
            "router_steps": 300, "router_tokens": 4096, "target_sparsity": 0.25,
            "num_train_batches": 8, "batch_size": 2, "seq_len": 256,
        },
    ),
    "long": (
        {"expert_size": 32, "clustering": "coactivation"},
        {
            "sparsify": True, "sparsify_steps": 2000, "sparsify_params": "all", "penalty_weight": 3e-5,
            "router_steps": 3000, "router_tokens": 65536, "coactivation_tokens": 8192, "target_sparsity": 0.5,
            "num_train_batches": 2000, "batch_size": 8, "seq_len": 512,
        },
    ),
}  # fmt: skip

registry.register(
    registry.Method(
        name="dynamic-k",
        description="FFNs -> dynamic-k experts with norm-regressing routers (D2DMoE); sparsify, cluster, route",
        config_cls=DynamicKConfig,
        plan=plan,
        apply=apply,
        remove=remove,
        calibrate=calibrate,
        recipes=RECIPES,
    )
)

__all__ = ["DynamicKConfig", "executed_fraction", "mode", "set_mode", "set_tau", "track_executed"]
