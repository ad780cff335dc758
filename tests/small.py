"""Two-layer random models and helpers shared by the expert-method tests (dynamic-k, lte, mot)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP barrier stalls on a shared 2-core machine (10x here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def small(kind: str = "llama", inter: int = 64, layers: int = 2, *, noise: str = "all") -> torch.nn.Module:
    """A ``kind`` model with hidden 32 and ``inter`` MLP neurons, seed 0, eval mode. ``noise="all"`` adds
    N(0, 0.1) to every 1-D parameter (norms not all ones, biases not zero); ``"gpt2-bias"`` redraws
    GPT-2's 1-D parameters from N(0, 0.1) and leaves other models as initialised."""
    common = dict(
        vocab_size=128, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=64, n_inner=inter)
    elif kind == "phi3":
        cfg = Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    elif kind == "gemma":
        cfg = GemmaConfig(**common, head_dim=8)
    else:
        cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 1:
                continue
            if noise == "all":
                p.add_(0.1 * torch.randn_like(p))
            elif kind == "gpt2":
                p.normal_(0, 0.1)
    return model


def ids(b: int = 2, t: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, use_cache=False).logits
