"""Modules and the patched MLP forward of dynamic-k.

Each converted MLP keeps its class, parameter names and weights (neurons permuted in place into
contiguous expert blocks) and gains two children:

- ``router``: ``Linear(d, w) -> ReLU -> Linear(w, E) -> abs``, predicting each expert's output L2 norm;
- ``expert_layout``: persistent buffers ``perm`` (position -> original neuron index, so ``unmodify``
  restores the original order exactly) and ``tau`` (this layer's threshold).

Selection: expert e runs for a token iff ``score_e >= tau * max_e score`` (and the argmax always runs);
selected experts' outputs are summed unweighted. ``tau == 0`` runs every expert (dense).

Execution modes (set with :func:`set_mode` / the :func:`mode` context manager, not saved):

- ``"sparse"`` (default): router scores, CPU/GPU execution through ``condify.ops.expert_mlp``, which
  reads only the selected experts' contiguous blocks;
- ``"oracle"``: select by the true expert output norms (computes the dense hidden layer; for
  measuring layout error apart from router error, not for speed);
- ``"dense"``: plain differentiable MLP that records hidden activations (sparsification fine-tune).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import Adapter
from ...convert import patched

try:  # dispatching op (Triton on CUDA, reference elsewhere)
    from ...ops import expert_mlp
except ImportError:  # the ops package without its dispatcher: use the plain-torch reference
    from ...ops.reference import expert_mlp_reference as expert_mlp

METHOD = "dynamic-k"
MODES = ("sparse", "oracle", "dense")

ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
_ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def model_activation(config: Any) -> str | None:
    """The MLP activation of a transformers config as an ``expert_mlp`` name (None if unsupported)."""
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, key, None)
        if name:
            return ACT_NAMES.get(name)
    return None


class Router(nn.Module):
    """``Linear(d, w) -> ReLU -> Linear(w, E) -> abs``: predicted output norm of each expert."""

    def __init__(self, d: int, width: int, experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))).abs()


class ExpertLayout(nn.Module):
    """Persistent state of one converted MLP: the neuron permutation and the threshold."""

    def __init__(self, perm: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.register_buffer("perm", perm.to(torch.int64))
        self.register_buffer("tau", torch.tensor(float(tau)))


def select(scores: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Boolean (T, E) mask: ``scores >= tau * max``, with each token's argmax always selected."""
    top = scores.max(-1, keepdim=True)
    mask = scores >= top.values * tau
    return mask.scatter_(-1, top.indices, True)


def hidden(
    x: torch.Tensor, w: dict[str, torch.Tensor | None], act: str, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense MLP hidden activations (differentiable; works on the adapter's weight views)."""
    up = F.linear(x, w["up"], w["b_up"])
    if w["gate"] is None:
        return _ACT_FNS[act](up)
    return _ACT_FNS[act](F.linear(x, w["gate"], w["b_gate"])) * up


def expert_norms(h: torch.Tensor, down: torch.Tensor, expert_size: int, chunk: int = 1024) -> torch.Tensor:
    """True output L2 norm of every expert for every token: (T, E) from hidden (T, I), down (d, I)."""
    T, inter = h.shape
    E = inter // expert_size
    wd = down.reshape(down.shape[0], E, expert_size)
    out = []
    for i in range(0, T, chunk):
        hc = h[i : i + chunk].reshape(-1, E, expert_size)
        out.append(torch.einsum("tes,des->ted", hc, wd).norm(dim=-1))
    return torch.cat(out) if out else h.new_zeros(0, E)


def _down(out: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return out if b is None else out + b


def moe_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a converted MLP (installed as an instance method)."""
    info = self._condify_patch.info
    a: Adapter = info["adapter"]
    s: int = info["expert_size"]
    act: str = info["activation"]
    w = a.mlp_weights(self)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    mode = info.get("mode", "sparse")
    rec = info.get("record")

    if mode == "dense":
        h = hidden(xf, w, act)
        if rec is not None:
            rec.append(h)
        return _down(F.linear(h, w["down"]), w["b_down"]).reshape(shape)

    # a Python float outside torch.compile (fast tau == 0 path); the buffer itself while tracing (no sync)
    tau = self.expert_layout.tau if torch.compiler.is_compiling() else float(self.expert_layout.tau)
    if mode == "oracle":
        h = hidden(xf, w, act)
        mask = select(expert_norms(h, w["down"], s), tau)
        out = F.linear(h * mask.repeat_interleave(s, dim=1), w["down"])
    else:
        E = w["up"].shape[0] // s
        if isinstance(tau, float) and tau == 0.0:
            mask = torch.ones(xf.shape[0], E, dtype=torch.bool, device=x.device)
        else:
            mask = select(self.router(xf), tau)
        c = {k: (v.contiguous() if v is not None else None) for k, v in w.items()}  # no-op unless Conv1D
        out = expert_mlp(
            xf, c["up"], c["down"], mask, s, act, w_gate=c["gate"], b_up=c["b_up"], b_gate=c["b_gate"]
        )
    track = info.get("track")
    if track is not None:
        track[0] += int(mask.sum())
        track[1] += mask.numel()
    return _down(out, w["b_down"]).reshape(shape)


def converted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, MLP) of every MLP converted by dynamic-k."""
    return patched(model, METHOD)


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every converted MLP to ``"sparse"``, ``"oracle"`` or ``"dense"`` execution."""
    if mode not in MODES:
        raise ValueError(f"dynamic-k: mode must be one of {MODES}, got {mode!r}")
    for _, m in converted(model):
        m._condify_patch.info["mode"] = mode


@contextlib.contextmanager
def mode(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily run the converted MLPs in mode ``name`` (e.g. ``with mode(model, "oracle"): ...``)."""
    old = [(m, m._condify_patch.info.get("mode", "sparse")) for _, m in converted(model)]
    set_mode(model, name)
    try:
        yield
    finally:
        for m, o in old:
            m._condify_patch.info["mode"] = o


@contextlib.contextmanager
def track_executed(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Count selected expert-token pairs per converted MLP: ``{path: [selected, total]}``."""
    stats = {p: [0, 0] for p, _ in converted(model)}
    for p, m in converted(model):
        m._condify_patch.info["track"] = stats[p]
    try:
        yield stats
    finally:
        for _, m in converted(model):
            m._condify_patch.info.pop("track", None)


def executed_fraction(stats: dict[str, list[int]]) -> float:
    """Fraction of expert compute executed over all tracked layers."""
    sel = sum(v[0] for v in stats.values())
    tot = sum(v[1] for v in stats.values())
    return sel / tot if tot else float("nan")


def set_tau(model: nn.Module, tau: float | dict[str, float]) -> None:
    """Set the threshold of every converted MLP (one value, or ``{path: tau}``)."""
    for p, m in converted(model):
        t = tau[p] if isinstance(tau, dict) else tau
        if t < 0:
            raise ValueError(f"dynamic-k: tau must be >= 0, got {t}")
        m.expert_layout.tau.fill_(float(t))
