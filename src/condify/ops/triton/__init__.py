"""Triton kernels (imported lazily by ``condify.ops`` when a CUDA tensor, or the interpreter, needs them)."""

from .expert_mlp import expert_mlp_launch, group_tokens
from .tokens import compact_tokens_launch, scatter_tokens_launch

__all__ = ["compact_tokens_launch", "expert_mlp_launch", "group_tokens", "scatter_tokens_launch"]
