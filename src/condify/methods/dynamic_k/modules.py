"""Modules and the patched MLP forward of dynamic-k.

Each converted MLP keeps its class, parameter names and weights (neurons permuted in place into
contiguous expert blocks) and gains two children:

- ``router``: ``Linear(d, w) -> ReLU -> Linear(w, E) -> abs``, predicting each expert's output L2 norm;
- ``expert_layout``: persistent buffers ``perm`` (position -> original neuron index, so ``unmodify``
  restores the original order exactly) and ``tau`` (this layer's threshold).

With ``attention=True`` every attention projection (q/k/v/o, or fused qkv) is converted the same way,
after it gains a third child ``expert_mlp`` (:class:`.projection.ProjectionMLP`, ``Linear -> ReLU ->
Linear``) that replaces the linear map; the projection's own weight stays, untouched, as the distillation
target and for ``unmodify``. Each site's typed state is an :class:`ExpertSite` (``site``: ``"mlp"`` or
the projection name).

Selection: expert e runs for a token iff ``score_e >= tau * max_e score`` (and the argmax always runs);
selected experts' outputs are summed unweighted. ``tau == 0`` runs every expert (dense).

Execution modes (set with :func:`set_mode` / the :func:`mode` context manager, not saved):

- ``"sparse"`` (default): router scores, CPU/GPU execution through ``condify.ops.expert_mlp``, which
  reads only the selected experts' contiguous blocks;
- ``"masked"``: the router's selection applied as a mask to the dense hidden layer: the same function
  as ``"sparse"``, differentiable in the MLP weights (routers excluded), for fine-tuning the model
  under its own routing (``calibrate(adapt_steps=...)``);
- ``"oracle"``: select by the true expert output norms (computes the dense hidden layer; for
  measuring layout error apart from router error, not for speed);
- ``"dense"``: plain differentiable MLP that records hidden activations (sparsification fine-tune);
- ``"original"``: the module's own class forward (for a projection: the original linear map).

Wrapped projections. The fast paths read the gate/up/down weights (:meth:`Adapter.mlp_weights`); they
run only while every projection is :func:`plain` (exactly an ``nn.Linear`` / transformers ``Conv1D``
with plain tensors, no hooks). When one is not (PEFT LoRA, a forward hook, a quantised or parametrized
Linear, accelerate's offload hooks), the forward calls the projection modules themselves: every mode
then computes ``down(act(gate(x)) * up(x) * mask)`` on the dense hidden layer with the same selection,
the same function as the sparse path, differentiable through the wrapped modules, and counts the same
executed fraction for :func:`condify.track` (what the sparse path would run, not the dense work done).
With ``attention=True`` a converted projection runs its ``expert_mlp``, not its own weight: adapt
``expert_mlp.up`` / ``expert_mlp.down`` (what runs; LoRA there trains and merges like on an MLP). A LoRA
wrapper on the projection itself adds its delta to the converted output, but ``merge_and_unload`` would
fold it into the unused original weight, and PEFT cannot wrap the projection and its expert MLP at once
(``target_modules="all-linear"`` fails inside PEFT on these nested linears).

Routers. A router whose linears are not plain is called as a module (hooks fire). A PEFT adapter on a
router (e.g. ``target_modules="all-linear"`` matches ``router.fc1``/``fc2``) is refused with a
:class:`~condify.config.ConfigError` at the first forward (in every mode but ``"original"``, also while
``tau == 0`` leaves the router unused): routers are fitted by ``calibrate``
(regression on expert norms) and get no gradient from the model's loss, so the adapter would never
train. :data:`PEFT_EXCLUDE` is the ``exclude_modules`` pattern that leaves them out.

Meta device. Every mode runs on meta tensors (shape only): the threshold stays a tensor there.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import Adapter
from ...config import ConfigError
from ...hooks import global_hooks
from ...ops import expert_mlp, sparse_ffn  # custom ops: Triton on CUDA, compiled kernel / torch on CPU
from ...patching import SiteState, patched
from ...tracking import Tracking, track
from .projection import ProjectionWeights

METHOD = "dynamic-k"
MODES = ("sparse", "masked", "oracle", "dense", "original")

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


try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

_PLAIN_TYPES = frozenset(t for t in (nn.Linear, Conv1D) if t is not None)
PEFT_EXCLUDE = r".*\.router(\..*)?"  # PEFT ``exclude_modules``: every condify router (and its linears)


_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def no_hooks(m: nn.Module) -> bool:
    """True if calling ``m`` runs only its class ``forward``: no forward/backward (pre-)hooks of its own
    and no instance-level ``forward`` (accelerate's ``add_hook_to_module`` sets one); global hooks are
    :func:`global_hooks`. Reads ``__dict__`` directly: this runs on every decode step."""
    d = m.__dict__
    return not (
        d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
    ) and ("forward" not in d)


def _plain(m: nn.Module | None) -> bool:
    return m is None or (
        type(m) in _PLAIN_TYPES
        and type(m.__dict__["_parameters"].get("weight")) in _PLAIN_TENSORS
        and no_hooks(m)
    )


def plain(m: nn.Module | None) -> bool:
    """True if calling ``m`` is exactly ``F.linear`` on its ``weight`` and ``bias`` (transposed weight for
    Conv1D), so a forward may read them instead: ``m`` is exactly an ``nn.Linear`` or transformers
    ``Conv1D`` (a PEFT, quantised or parametrized Linear has another class), its weight a plain tensor
    (not a tensor subclass), :func:`no_hooks` and no :func:`global_hooks`. ``None`` (no such projection)
    counts as plain."""
    return _plain(m) and not global_hooks()


def is_peft_layer(m: nn.Module) -> bool:
    """True if ``m`` is a PEFT tuner layer (LoRA, IA3, ...); False when PEFT is not imported."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and isinstance(m, tuners.BaseTunerLayer)


def check_router(mlp: nn.Module, method: str, layer: int, why: str) -> None:
    """Raise :class:`ConfigError` if a PEFT adapter wraps ``mlp.router`` or any module inside it."""
    for name, m in mlp.router.named_modules(prefix="router"):
        if is_peft_layer(m):
            raise ConfigError(
                f"{method}: PEFT wrapped the condify router `{name}` of the MLP of layer {layer} "
                f"({type(m).__module__}.{type(m).__name__}); condify routers are not PEFT targets: {why}. "
                f"Leave them out of target_modules (with target_modules='all-linear' pass "
                f"exclude_modules={PEFT_EXCLUDE!r})"
            )


def scalar(t: torch.Tensor) -> float | torch.Tensor:
    """``float(t)`` in eager mode; ``t`` itself while compiling (no sync) or on the meta device (no data)."""
    return t if torch.compiler.is_compiling() or t.device.type == "meta" else float(t)


def model_activation(config: Any) -> str | None:
    """The MLP activation of a transformers config as an ``expert_mlp`` name (None if unsupported)."""
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, key, None)
        if name:
            return ACT_NAMES.get(name)
    return None


@dataclass
class ExpertSite(SiteState):
    """State of one converted MLP or projection (its router and layout are children)."""

    adapter: Any = field(default=None, repr=False)  # an Adapter, or PROJECTION for projections
    expert_size: int = 1
    experts: int = 1
    activation: str = "silu"
    site: str = "mlp"
    mode: str = "sparse"  # runtime: one of MODES, not saved
    record: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)  # dense-mode hidden

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "mlp" if self.site == "mlp" else "attention"

    def describe(self) -> dict[str, Any]:
        return {"experts": self.experts, "expert_size": self.expert_size}


def require_activation(config: Any, method: str) -> str:
    """:func:`model_activation`, or a ConfigError naming ``method`` when it is unsupported."""
    act = model_activation(config)
    if act is None:
        raise ConfigError(f"{method}: the model's MLP activation is not one of silu/gelu/gelu_tanh/relu")
    return act


class Router(nn.Module):
    """``Linear(d, w) -> ReLU -> Linear(w, E) -> abs``: predicted output norm of each expert."""

    def __init__(self, d: int, width: int, experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain(self.fc1) and plain(self.fc2):  # F.linear: no submodule calls on the decode path
            h = F.relu(F.linear(x, self.fc1.weight, self.fc1.bias))
            return F.linear(h, self.fc2.weight, self.fc2.bias).abs()
        return self.fc2(F.relu(self.fc1(x))).abs()  # wrapped (hooks, quantised): call the modules


_ROUTER_WHY = (
    "dynamic-k routers are fitted by condify.calibrate (regression on the experts' output norms) and get "
    "no gradient from the model's loss, so an adapter on them would never train"
)


def router_plain(r: nn.Module) -> bool:
    """True if ``r`` is condify's :class:`Router` with plain linears and no hooks (its weights may be read)."""
    if type(r) is not Router or not no_hooks(r) or global_hooks():
        return False
    mods = r._modules
    return _plain(mods["fc1"]) and _plain(mods["fc2"])


def checked_router(mlp: nn.Module, st: ExpertSite) -> bool:
    """:func:`router_plain` of ``mlp.router``; raises if a PEFT adapter wraps it (even while ``tau == 0``
    does not call it: the error must not wait for calibration)."""
    if router_plain(mlp.router):
        return True
    check_router(mlp, METHOD, st.layer, _ROUTER_WHY)
    return False


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


def select_one(scores: torch.Tensor, tau: float) -> list[bool]:
    """:func:`select` for one token's (E,) scores, as a Python list (same result for 0 <= tau <= 1,
    where the argmax always passes ``score >= tau * max``)."""
    sel = (scores >= scores.max() * tau).tolist()
    if not any(sel):  # NaN scores: run the argmax, as select does
        sel[int(scores.argmax())] = True
    return sel


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


def _blocks(name: str, w: torch.Tensor | None) -> torch.Tensor | None:
    """``w`` as ``expert_mlp`` reads it: contiguous, or column-major for ``down``. A no-op for the
    layout ``modify`` stores (``block_layout_``); a copy only if something re-strided the weights."""
    if w is None or w.is_contiguous() or (name == "down" and w.t().is_contiguous()):
        return w
    return w.contiguous()


def _down(out: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return out if b is None else out + b


def mlp_modules(adapter: Any, mlp: nn.Module) -> dict[str, nn.Module | None]:
    """The projection modules of a converted MLP (``gate``, ``up``, ``down``, fused ``gate_up``; None
    where absent), for an :class:`Adapter` or :data:`PROJECTION`."""
    if isinstance(adapter, ProjectionWeights):
        return adapter.mlp_modules(mlp)

    mods = mlp._modules  # not getattr: nn.Module.__getattr__ is slow, and this runs every decode step

    def get(name: str | None) -> nn.Module | None:
        return None if name is None else mods[name] if "." not in name else mlp.get_submodule(name)

    return {"gate": get(adapter.gate), "up": get(adapter.up), "down": get(adapter.down),
            "gate_up": get(adapter.gate_up)}  # fmt: skip


def all_plain(mods: dict[str, nn.Module | None]) -> bool:
    """True if every projection in ``mods`` is :func:`plain` (the weight-reading fast paths may run)."""
    return not global_hooks() and all(_plain(m) for m in mods.values())


def module_hidden(mods: dict[str, nn.Module | None], x: torch.Tensor, act: str) -> torch.Tensor:
    """Dense MLP hidden activations ``act(gate(x)) * up(x)`` (``act(up(x))`` without a gate), calling the
    projection modules (so PEFT adapters, hooks and quantised linears take part); :func:`hidden` on them."""
    fn = _ACT_FNS[act]
    if mods["gate_up"] is not None:
        gate, up = mods["gate_up"](x).chunk(2, dim=-1)
        return fn(gate) * up
    up = mods["up"](x)
    return fn(up) if mods["gate"] is None else fn(mods["gate"](x)) * up


def module_expert_norms(h: torch.Tensor, down: nn.Module, expert_size: int) -> torch.Tensor:
    """:func:`expert_norms` through the ``down`` module: expert e's output is ``down(h_e) - down(0)`` with
    ``h_e`` the hidden layer restricted to block e (exact for any affine ``down``, LoRA included)."""
    T, inter = h.shape
    E = inter // expert_size
    blocks = torch.eye(E, dtype=h.dtype, device=h.device).repeat_interleave(expert_size, dim=1)  # (E, I)
    base = down(h.new_zeros(1, inter))
    chunk = max(1, (1 << 22) // max(1, E * inter))
    out = [(down(h[i : i + chunk, None, :] * blocks) - base).norm(dim=-1) for i in range(0, T, chunk)]
    return torch.cat(out) if out else h.new_zeros(0, E)


def _module_forward(
    self: nn.Module, st: ExpertSite, mods: dict[str, nn.Module | None], xf: torch.Tensor
) -> torch.Tensor:
    """Every mode by calling the projections (some are not :func:`plain`): ``down(h * mask)`` on the
    dense hidden layer ``h``, with the mask the sparse path would use; the down bias comes from ``down``."""
    s, mode = st.expert_size, st.mode
    h = module_hidden(mods, xf, st.activation)
    if mode == "dense":
        if st.record is not None:
            st.record.append(h)
        return mods["down"](h)
    E = h.shape[-1] // s
    tau = scalar(self.expert_layout.tau)
    with torch.no_grad():
        if mode == "oracle":
            mask = select(module_expert_norms(h, mods["down"], s), tau)
        elif isinstance(tau, float) and tau == 0.0:
            mask = torch.ones(xf.shape[0], E, dtype=torch.bool, device=xf.device)
        else:
            mask = select(self.router(xf), tau)
    if st.counter is not None:
        st.count(mask.sum(), xf.shape[0] * E)
    return mods["down"](h * mask.repeat_interleave(s, dim=1).to(h.dtype))


def moe_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a converted MLP (installed as an instance method)."""
    st: ExpertSite = self._condify_patch.state
    mode = st.mode
    if mode == "original":
        return type(self).forward(self, x, *args, **kwargs)
    a: Adapter = st.adapter
    s, act = st.expert_size, st.activation
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    fast_router = checked_router(self, st)
    mods = mlp_modules(a, self)
    if not all_plain(mods):  # a wrapped projection: call the modules, never read around them
        return _module_forward(self, st, mods, xf).reshape(*shape[:-1], -1)
    w = a.mlp_weights(self)
    rec = st.record

    if mode == "dense":
        h = hidden(xf, w, act)
        if rec is not None:
            rec.append(h)
        return _down(F.linear(h, w["down"]), w["b_down"]).reshape(*shape[:-1], -1)

    # a Python float in eager mode (fast tau == 0 path); the buffer itself while tracing or on meta
    tau = scalar(self.expert_layout.tau)
    E = w["up"].shape[0] // s
    if mode in ("oracle", "masked"):
        h = hidden(xf, w, act)
        with torch.no_grad():
            scores = expert_norms(h, w["down"], s) if mode == "oracle" else self.router(xf)
            mask = select(scores, tau)
        out = F.linear(h * mask.repeat_interleave(s, dim=1).to(h.dtype), w["down"])
        selected: torch.Tensor | int = mask
    else:
        c = {k: _blocks(k, v) for k, v in w.items()}
        dense = isinstance(tau, float) and tau == 0.0
        r = self.router
        if (
            fast_router
            and not dense
            and xf.device.type == "cpu"
            and not torch.is_grad_enabled()
            and isinstance(tau, float)
        ):
            # inference on CPU: router + selection + experts in one fused call (compiled kernel at decode)
            out, mask = sparse_ffn(
                xf, r.fc1.weight, r.fc1.bias, r.fc2.weight, r.fc2.bias, "tau_max", tau,
                c["up"], c["down"], s, act, c["gate"], c["b_up"], c["b_gate"],
            )  # fmt: skip
        else:
            if dense:
                mask = torch.ones(xf.shape[0], E, dtype=torch.bool, device=x.device)
            else:
                mask = select(self.router(xf), tau)
            out = expert_mlp(
                xf, c["up"], c["down"], mask, s, act, w_gate=c["gate"], b_up=c["b_up"], b_gate=c["b_gate"]
            )
        selected = mask
    if st.counter is not None:
        st.count(selected.sum() if isinstance(selected, torch.Tensor) else selected, xf.shape[0] * E)
    return _down(out, w["b_down"]).reshape(*shape[:-1], -1)


def converted(model: nn.Module, site: str | None = None) -> list[tuple[str, nn.Module]]:
    """(path, module) of every site converted by dynamic-k: MLPs and projections, or only ``site``
    (``"mlp"``, ``"attention"`` for every projection)."""
    out = patched(model, METHOD)
    if site is None:
        return out
    if site == "attention":
        return [(p, m) for p, m in out if m._condify_patch.state.site != "mlp"]
    return [(p, m) for p, m in out if m._condify_patch.state.site == site]


Sites = list[tuple[str, nn.Module]]


def set_mode(model: nn.Module, mode: str, sites: Sites | None = None) -> None:
    """Switch every converted site (or only ``sites``) to one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"dynamic-k: mode must be one of {MODES}, got {mode!r}")
    for _, m in converted(model) if sites is None else sites:
        m._condify_patch.state.mode = mode


@contextlib.contextmanager
def mode(model: nn.Module, name: str, sites: Sites | None = None) -> Iterator[None]:
    """Temporarily run the converted sites (or only ``sites``) in mode ``name``
    (e.g. ``with mode(model, "oracle"): ...``)."""
    sites = converted(model) if sites is None else sites
    old = [(m, m._condify_patch.state.mode) for _, m in sites]
    set_mode(model, name, sites)
    try:
        yield
    finally:
        for m, o in old:
            m._condify_patch.state.mode = o


def track_executed(model: nn.Module) -> contextlib.AbstractContextManager[Tracking]:
    """:func:`condify.track` (kept for existing code): executed expert-token pairs per converted site."""
    return track(model)


def executed_fraction(stats: Tracking, paths: list[str] | None = None) -> float:
    """Fraction of dynamic-k expert compute executed over the tracked sites (all, or those in ``paths``)."""
    return stats.fraction(METHOD, paths=paths)


def set_tau(model: nn.Module, tau: float | dict[str, float]) -> None:
    """Set the threshold of every converted MLP (one value, or ``{path: tau}``)."""
    for p, m in converted(model):
        t = tau[p] if isinstance(tau, dict) else tau
        if t < 0:
            raise ValueError(f"dynamic-k: tau must be >= 0, got {t}")
        m.expert_layout.tau.fill_(float(t))
