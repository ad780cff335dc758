"""dynamic-k with ``attention=True``: the MLP that replaces an attention projection, and its weights as
the expert machinery reads them (a non-GLU MLP)."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionMLP(nn.Module):
    """``Linear(d_in, h) -> ReLU -> Linear(h, d_out)``: the MLP that replaces an attention projection."""

    def __init__(self, d_in: int, hidden: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_out, bias=bias)

    @torch.no_grad()
    def init_from_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Exact best rank-``h/2`` approximation of ``x @ weight.T + bias`` (``weight`` is (d_out, d_in)).

        With ``u_i, s_i, v_i`` the top singular triplets, neurons ``2i, 2i+1`` compute ``relu(±v_i x)``
        and the down projection adds ``±s_i u_i`` times them, since ``relu(z) - relu(-z) = z``. So the
        MLP equals the linear map when ``h >= 2 * min(d_in, d_out)``, and exactly half of the hidden
        neurons are zero for every token.
        """
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        k = min(self.up.out_features // 2, s.numel())
        up = torch.zeros_like(self.up.weight, dtype=torch.float32)
        down = torch.zeros_like(self.down.weight, dtype=torch.float32)
        up[0 : 2 * k : 2], up[1 : 2 * k : 2] = vh[:k], -vh[:k]
        down[:, 0 : 2 * k : 2], down[:, 1 : 2 * k : 2] = u[:, :k] * s[:k], -u[:, :k] * s[:k]
        self.up.weight.copy_(up)
        self.up.bias.zero_()
        self.down.weight.copy_(down)
        if self.down.bias is not None:
            self.down.bias.copy_(bias if bias is not None else torch.zeros_like(self.down.bias))


class ProjectionWeights:
    """``mlp_weights`` / ``mlp_modules`` of a converted projection: its ``expert_mlp`` as a non-GLU MLP."""

    def mlp_modules(self, module: nn.Module) -> dict[str, nn.Module | None]:
        e = module._modules["expert_mlp"]._modules
        return {"gate": None, "up": e["up"], "down": e["down"], "gate_up": None}

    def mlp_weights(self, module: nn.Module) -> dict[str, torch.Tensor | None]:
        e = module.expert_mlp
        return {
            "gate": None, "up": e.up.weight, "down": e.down.weight,
            "b_gate": None, "b_up": e.up.bias, "b_down": e.down.bias,
        }  # fmt: skip


PROJECTION = ProjectionWeights()
