"""mot: dense FFNs -> Mixture of Tokens, then transition-tuned to a token-choice MoE (arXiv 2310.15961).

``modify`` slices each converted MLP (default: the second half of the blocks) into ``num_experts``
contiguous neuron blocks (after a balanced k-means permutation, in place) and adds a controller
``router``. In the ``"mot"`` stage, tokens at one position across ``group_size`` sequences are mixed
per expert (continuous, causal, needs batch % G == 0). ``calibrate(stage="mot")`` trains it;
``calibrate(stage="transition")`` turns it into a sparse token-choice MoE (top-k through
``condify.ops.expert_mlp``, any batch size, ``generate`` with the cache) and fine-tunes it; the stage is
saved in the config. ``stage="full"`` (the default) does both in one call: one pass of MoT, then the
transition's recovery fine-tune (:func:`condify.training.recovery_steps`, 1-4 passes sized to the data);
at the switch each router is refit to rank experts by their outputs (``transition_router``).

The conversion is far from dense at init (each token receives about 1/G of the expert compute, on
mixed inputs): on SmolLM2-135M, G=2 and 16 experts in layers 15-29, held-out perplexity is x29 of dense
at t=1 and x12 at t=0.01, and x2.4 for the untrained top-8 transitioned MoE with the controller as its
router (x243 / x4.1 with G=4).
(validation plays, 512 tokens). Training is part of the method (``benchmarks/results/mot.md``).
"""

from __future__ import annotations

from ... import registry
from ...registry import Data, Recipe
from .calibrate import MoTCalibration, calibrate
from .config import MoTConfig
from .modules import converted, set_temperature, stage
from .transform import patch_target, remove, targets

# Budgets. "quick": CI smoke (seconds); "cpu": the main job on a 2-core CPU, ending in the transitioned
# model (44 steps of 4x64 tokens; the embedded model trained at ~10-20 tokens/s on the shared 2-core
# machine of benchmarks/results/mot.md, i.e. ~10-15 min there, a few minutes on a quiet one); "long": GPU-sized (not run). Each holds out 10 % of its batches; batch
# sizes are multiples of the group size.
RECIPES = {
    "quick": Recipe(
        {"group_size": 2, "num_experts": 8},
        {"stage": "full", "steps": 4, "transition_steps": 2},
        Data(2, 64, 4),
    ),
    "cpu": Recipe(
        {"group_size": 2, "num_experts": 16, "temperature": 0.1},
        {"stage": "full", "steps": 40, "transition_steps": 4, "lr": 1e-4, "temperature_end": 0.02},
        Data(4, 64, 24),
    ),
    "long": Recipe(
        {"group_size": 4, "num_experts": 32},
        {"stage": "full", "steps": 4000, "transition_steps": 400, "lr": 1e-4, "params": "all",
         "temperature_end": 0.1},
        Data(32, 512, 4400),
    ),
}  # fmt: skip

registry.register(
    registry.Method(
        name="mot",
        description="FFNs -> Mixture of Tokens (cross-example mixing), transition-tuned to a token-choice MoE",
        config_cls=MoTConfig,
        targets=targets,
        patch=patch_target,
        remove=remove,
        calibrate=calibrate,
        options=MoTCalibration,
        recipes=RECIPES,
    )
)

__all__ = ["MoTCalibration", "MoTConfig", "converted", "set_temperature", "stage"]
