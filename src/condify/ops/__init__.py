"""condify kernels. Each op ``x`` dispatches: Triton on CUDA tensors, the plain-torch ``x_reference`` elsewhere.

- ``expert_mlp``: dynamic expert FFN over contiguous neuron blocks (dynamic-k, lte).
- ``compact_tokens`` / ``scatter_tokens``: per-token layer skipping (mod-threshold).

Importing this package does not import Triton nor initialise CUDA; ``x_triton`` entry points need CUDA
tensors. The ops are also registered as ``torch.ops.condify.*`` custom ops (traceable by torch.compile).
"""

from ._dispatch import (
    compact_tokens,
    compact_tokens_triton,
    expert_mlp,
    expert_mlp_triton,
    scatter_tokens,
    scatter_tokens_triton,
)
from .reference import ACTIVATIONS, compact_tokens_reference, expert_mlp_reference, scatter_tokens_reference

__all__ = [
    "ACTIVATIONS",
    "compact_tokens",
    "compact_tokens_reference",
    "compact_tokens_triton",
    "expert_mlp",
    "expert_mlp_reference",
    "expert_mlp_triton",
    "scatter_tokens",
    "scatter_tokens_reference",
    "scatter_tokens_triton",
]
