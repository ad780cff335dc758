"""Tiny random configs of every adapter architecture, built offline."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GlmConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gemma3_text": lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=8, layer_types=["full_attention"] * 6
    ),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=8),  # sliding/full alternate
    "granite": lambda: GraniteConfig(**COMMON, residual_multiplier=0.5, embedding_multiplier=2.0),
    "olmo2": lambda: Olmo2Config(**COMMON, pad_token_id=0),  # norms after the blocks, none before
    "starcoder2": lambda: Starcoder2Config(**COMMON, sliding_window=8),  # plain MLP with biases
    "glm": lambda: GlmConfig(**COMMON, head_dim=16, pad_token_id=0),  # no adapter: the structural fallback
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=6, n_head=4, n_inner=96, vocab_size=128, n_positions=64),
}


def tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random model of ``arch`` in eval mode, norms perturbed so they are not all ones."""
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
