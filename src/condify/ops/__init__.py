"""condify kernels. Each op is one ``torch.ops.condify.*`` custom op (traceable by torch.compile) with a
kernel per backend: Triton on CUDA, on CPU a compiled C++ kernel (built on first use) with a plain-torch
fallback (``condify.ops.cpu``); ``x_reference`` is the few-line oracle the tests compare against.

- ``expert_mlp``: dynamic expert FFN over contiguous neuron blocks (dynamic-k, lte).
- ``sparse_ffn``: router + selection rule (tau*max or sigmoid threshold) + ``expert_mlp`` in one call.
- ``compact_tokens`` / ``scatter_tokens``: per-token layer skipping (mod-threshold).

Importing this package does not import Triton, initialise CUDA nor build the CPU kernel; ``x_triton``
entry points need CUDA tensors. ``CONDIFY_CPU_KERNEL=0|1`` forces the plain-torch / compiled CPU path.
"""

from ._dispatch import (
    compact_tokens,
    compact_tokens_triton,
    expert_mlp,
    expert_mlp_triton,
    scatter_tokens,
    scatter_tokens_triton,
    sparse_ffn,
)
from .cpu import expert_mlp_decode, expert_mlp_torch, kernel_available
from .reference import (
    ACTIVATIONS,
    compact_tokens_reference,
    expert_mlp_reference,
    router_scores_reference,
    scatter_tokens_reference,
    select_experts_reference,
    sparse_ffn_reference,
)

__all__ = [
    "ACTIVATIONS",
    "compact_tokens",
    "compact_tokens_reference",
    "compact_tokens_triton",
    "expert_mlp",
    "expert_mlp_decode",
    "expert_mlp_reference",
    "expert_mlp_torch",
    "expert_mlp_triton",
    "kernel_available",
    "router_scores_reference",
    "scatter_tokens",
    "scatter_tokens_reference",
    "scatter_tokens_triton",
    "select_experts_reference",
    "sparse_ffn",
    "sparse_ffn_reference",
]
