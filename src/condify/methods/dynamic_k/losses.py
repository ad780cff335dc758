"""Activation-sparsity penalties on MLP hidden activations (per token, averaged)."""

from __future__ import annotations

import torch


def square_hoyer(h: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over tokens of ``||a||_1^2 / ||a||_2^2`` (between 1 and the width; smaller = sparser)."""
    h = h.reshape(-1, h.shape[-1]).float()
    return (h.abs().sum(-1).square() / (h.square().sum(-1) + eps)).mean()


def l1(h: torch.Tensor) -> torch.Tensor:
    """Mean absolute activation."""
    return h.float().abs().mean()


PENALTIES = {"hoyer": square_hoyer, "l1": l1}
