"""Forward functions for a parallel pair of decoder layers (l, l+1).

``a = x + A_l(N1_l(x)) + A_{l+1}(N1_{l+1}(x))``, ``y = a + M_l(N2_l(a)) + M_{l+1}(N2_{l+1}(a))``.

Layer l runs the pair; layer l+1 passes hidden states through. When the two layers use different
attention types (Gemma-2/3: sliding and full), each needs the mask and rotary embeddings the model
gives it, so layer l passes its input through and leaves its arguments to layer l+1, which runs the
pair (``mixed``). Two execution paths, chosen on every call:

- generic: calls each layer's own norm/attention/MLP modules (any adapter; each attention writes its
  own KV-cache slot). Used whenever the fused path would skip a module that is not plain: an
  attention or MLP of another class than at ``modify`` time, a projection that is not exactly
  ``nn.Linear`` (PEFT LoRA, quantised or parametrized layers), any forward/backward (pre-)hook on
  those modules (transformers' own output-capturing hooks excepted, see below) or a global module
  hook. Those wrappers and hooks then run as they would in the dense model.
- fused (adapters with ``fusable``, plain modules): each layer's norm module is called on the input
  (the gains stay on the activation side: nothing is folded into weights), then one q|k|v product
  per layer, one attention call over both layers' heads (KV of both stored in slot l), the
  o-projections, gate|up and down, summed over the two layers. transformers' output-capturing hooks
  on the attention modules are called with each layer's own ``(output, weights)``, so
  ``output_attentions=True`` returns one map per layer (its head slice of the shared call).

Weights: there is no derived copy that could go stale. In eager inference (no gradient needed for
the projections) the pair's projection weights are *views of shared storage*: one ``[2, rows, d]``
tensor per group (q|k|v, o, gate|up, down), each layer's ``q_proj.weight`` being the contiguous
slice ``[i, q rows]`` of its group, so a group runs as one batched matmul over both layers. The
parameters stay the same ``nn.Parameter`` objects with their names; any in-place change (optimizer
steps, fused AdamW included, ``.data.copy_``, ``load_state_dict``) is a change of that storage and
is seen by construction. Every call checks in O(1) per parameter (address, dtype, shape, stride)
that each parameter still reads its slot of the group view; if not (``p.data = t``, ``model.to(dtype)``,
materialised meta weights, FSDP), the current values are copied into fresh shared storage and the
parameters pointed at it, under ``no_grad`` and outside inference mode, but only when nothing else
holds their storage (plain ``nn.Parameter``, storage referenced by these parameters alone);
otherwise the call multiplies by each parameter as it is (exact, no batching). The group tensor is
re-derived from the parameters on every call (``as_strided`` of the first one), never kept. When a
gradient is needed (training) and under ``torch.compile`` (where the storage check cannot be
traced) the fused path calls each projection module with its own parameter: differentiable w.r.t.
the original parameters, nothing copied, no check to trace. ``remove`` (``unmodify``) gives every
aliased parameter its own storage again, values unchanged. Saving needs nothing special: the views
are disjoint and contiguous (transformers clones them for safetensors).

The fused path keeps both layers' KV in slot l, the generic path each in its own, so a cache filled
on one path cannot be continued on the other (the next step fails with a shape mismatch): wrap or
hook paired modules between generations, not within one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from ...adapters import Adapter
from ...hooks import global_hooks
from ...patching import SiteState, cache_key, split_layer_args


@dataclass(frozen=True)
class Slot:
    """Where one projection weight lives in its group's shared ``[2, rows, cols]`` storage."""

    layer: int  # 0 or 1: which layer of the pair
    name: str  # the projection's name in the adapter: "q", "k", "v", "o", "gate", "up", "down"
    offset: int  # storage offset, in elements
    shape: tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Projections multiplied together: the slots tile a contiguous ``size`` tensor, slot 0 at offset 0."""

    name: str
    size: tuple[int, int, int]
    slots: tuple[Slot, ...]


GROUPS = (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",)))


def layout(shapes: list[dict[str, tuple[int, int] | None]]) -> tuple[Group, ...] | None:
    """The shared-storage layout of a pair from each layer's ``{projection: weight shape}``; None when
    a shape is unknown, the two layers' projections differ in shape or a group's in width."""
    if shapes[0] != shapes[1] or None in shapes[0].values():
        return None
    groups = []
    for name, members in GROUPS:
        cols = {shapes[0][m][1] for m in members}
        if len(cols) != 1:
            return None
        rows = sum(shapes[0][m][0] for m in members)
        (c,) = cols
        slots, offset = [], 0
        for i in range(2):
            for m in members:
                slots.append(Slot(i, m, offset, shapes[i][m]))
                offset += shapes[i][m][0] * c
        groups.append(Group(name, (2, rows, c), tuple(slots)))
    return tuple(groups)


@dataclass
class PairState(SiteState):
    """State of a layer in a parallel pair: the first runs both (``partner`` is the second)."""

    kind: ClassVar[str] = "none"  # nothing is skipped per token: not counted by condify.track
    pair: tuple[int, int] = (0, 1)
    adapter: Adapter | None = field(default=None, repr=False)
    partner: nn.Module | None = field(default=None, repr=False)
    fused: bool = False  # the pair runs fused when its modules are plain (see the module docstring)
    mixed: bool = False  # the layers' attention types differ: the second layer runs the pair
    stash: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # first layer's kwargs
    classes: tuple[type, type] | None = field(default=None, repr=False)  # (attention, MLP) at modify
    groups: tuple[Group, ...] | None = field(default=None, repr=False)  # shared-storage layout (fused)

    def describe(self) -> dict[str, Any]:
        return {"pair": self.pair, "fused": self.fused, **({"mixed": True} if self.mixed else {})}


_DROP = ("encoder_hidden_states", "encoder_attention_mask", "output_attentions")


def _pair(
    a: Adapter, layers: tuple[nn.Module, nn.Module], x: torch.Tensor, kws: tuple[dict, dict]
) -> torch.Tensor:
    h = x + a.attn_update(layers[0], x, **kws[0]) + a.attn_update(layers[1], x, **kws[1])
    return h + a.mlp_update(layers[0], h) + a.mlp_update(layers[1], h)


def _args(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    x, kw = split_layer_args(layer, args, kwargs)
    return x, {k: v for k, v in kw.items() if k not in _DROP}


def pair_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of the first layer of a pair (installed as an instance method)."""
    st: PairState = self._condify_patch.state
    a, other = st.adapter, st.partner
    x, kw = _args(self, args, kwargs)
    if st.mixed:  # the second layer runs the pair with each layer's own arguments
        other._condify_patch.state.stash = kw
        return x
    if st.fused:
        parts = plain_parts(st, (self, other))
        if parts is not None:
            return _fused(st, (self, other), parts, x, kw)
    return _pair(a, (self, other), x, (kw, kw))


def second_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of the second layer of a pair: its work was done by the first, unless the pair is mixed."""
    st: PairState = self._condify_patch.state
    if not st.mixed:
        return split_layer_args(self, args, kwargs)[0]
    x, kw = _args(self, args, kwargs)
    first_kw = st.stash  # kept (not consumed): gradient checkpointing re-runs this forward
    if first_kw is None:
        raise RuntimeError(f"layer-parallel: layer {st.pair[1]} ran without layer {st.pair[0]} before it")
    return _pair(st.adapter, (st.partner, self), x, (first_kw, kw))


# --------------------------------------------------------------------------- which path


@dataclass(frozen=True)
class Parts:
    """One layer's modules that the fused path runs without calling them."""

    attn: nn.Module
    mlp: nn.Module
    proj: dict[str, nn.Linear]  # "q", "k", "v", "o", "gate", "up", "down"


def _sub(m: nn.Module, name: str) -> nn.Module:
    """``m.get_submodule(name)``, fast for a direct child (this runs on every call)."""
    child = m._modules.get(name)
    return child if child is not None else m.get_submodule(name)


def _is_capture_hook(hook: Any) -> bool:
    """transformers' output-capturing hook (``output_attentions``): the fused path calls it itself."""
    return (
        getattr(hook, "__name__", None) == "output_capturing_hook"
        and getattr(hook, "__module__", None) == "transformers.utils.output_capturing"
    )


def _hooked(m: nn.Module, allow_capture: bool = False) -> bool:
    if m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return True
    hooks = m._forward_hooks
    return bool(hooks) and not (allow_capture and all(_is_capture_hook(h) for h in hooks.values()))


def parts(a: Adapter, layer: nn.Module) -> Parts:
    """The attention, MLP and projection modules of ``layer`` (looked up now: they may be replaced)."""
    attn, mlp = _sub(layer, a.attn), _sub(layer, a.mlp)
    proj = {n: _sub(attn, getattr(a, n)) for n in ("q", "k", "v", "o")}
    proj.update({n: _sub(mlp, getattr(a, n)) for n in ("gate", "up", "down")})
    return Parts(attn, mlp, proj)


def plain_parts(st: PairState, layers: tuple[nn.Module, nn.Module]) -> tuple[Parts, Parts] | None:
    """Both layers' parts if the fused path may run them (every module it does not call is plain), else
    None: the generic path then calls each layer's own modules."""
    if global_hooks():
        return None
    out = []
    for layer in layers:
        p = parts(st.adapter, layer)
        if type(p.attn) is not st.classes[0] or type(p.mlp) is not st.classes[1]:
            return None
        if _hooked(p.attn, allow_capture=True) or _hooked(p.mlp):
            return None
        for lin in p.proj.values():
            if type(lin) is not nn.Linear or _hooked(lin):
                return None
        out.append(p)
    return out[0], out[1]


# --------------------------------------------------------------------------- shared storage


def _weights(groups: tuple[Group, ...], ps: tuple[Parts, Parts]) -> list[torch.Tensor | None]:
    """Each slot's registered ``weight`` parameter (None where the module holds none)."""
    return [ps[s.layer].proj[s.name]._parameters.get("weight") for g in groups for s in g.slots]


def _base(w: torch.Tensor) -> int:
    """The address of ``w``'s storage (two live storages never share one)."""
    return w.data_ptr() - w.storage_offset() * w.element_size()


def _aliased(groups: tuple[Group, ...], ws: list[torch.Tensor | None]) -> bool:
    """Whether each weight reads exactly the bytes of its slot in a group view over the storage of the
    group's first weight (O(1) per weight: address, dtype, shape, stride)."""
    i = 0
    for g in groups:
        first = ws[i]
        if type(first) is not nn.Parameter or first.storage_offset() != 0:
            return False
        ptr, dtype, size = first.data_ptr(), first.dtype, first.element_size()
        if first.untyped_storage().nbytes() < g.size[0] * g.size[1] * g.size[2] * size:
            return False
        stride = (g.size[2], 1)
        for s in g.slots:
            w = ws[i]
            i += 1
            if (
                type(w) is not nn.Parameter
                or w.data_ptr() != ptr + s.offset * size
                or w.dtype != dtype
                or w.shape != s.shape
                or w.stride() != stride
            ):
                return False
    return True


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _exclusive(ws: list[torch.Tensor]) -> bool:
    """Whether these weights' storages are held by these weights alone (so nobody can see them move)."""
    if _use_count is None:
        return False
    held = Counter(_base(w) for w in ws)
    # the temporary storage object of `untyped_storage()` holds one reference too
    return all(_use_count(w.untyped_storage()._cdata) == held[_base(w)] + 1 for w in ws)


def _movable(groups: tuple[Group, ...], ws: list[torch.Tensor | None]) -> bool:
    ref = ws[0]
    if type(ref) is not nn.Parameter or ref.device.type == "meta":
        return False
    slots = [s for g in groups for s in g.slots]
    for w, s in zip(ws, slots, strict=True):
        if (
            type(w) is not nn.Parameter
            or w.layout != torch.strided
            or w.dtype != ref.dtype
            or w.device != ref.device
            or w.is_inference()
            or tuple(w.shape) != s.shape
        ):
            return False
    return _exclusive(ws)


def alias(groups: tuple[Group, ...], ws: list[torch.Tensor]) -> None:
    """Copy the weights into fresh shared storage, one tensor per group, and point each at its slot."""
    with torch.inference_mode(False), torch.no_grad():
        i = 0
        for g in groups:
            flat = torch.empty(g.size, dtype=ws[i].dtype, device=ws[i].device).view(-1)
            for s in g.slots:
                view = flat[s.offset : s.offset + s.shape[0] * s.shape[1]].view(s.shape)
                view.copy_(ws[i])
                ws[i].data = view
                i += 1


def unalias(groups: tuple[Group, ...], ps: tuple[Parts, Parts]) -> None:
    """Give every weight that shares storage with another of the pair its own storage (values kept)."""
    ws = [getattr(ps[s.layer].proj[s.name], "weight", None) for g in groups for s in g.slots]
    ws = [w for w in ws if isinstance(w, torch.Tensor) and w.device.type != "meta"]
    held = Counter(_base(w) for w in ws)
    with torch.inference_mode(False), torch.no_grad():
        for w in ws:
            if held[_base(w)] > 1:
                w.data = w.data.clone()


def shared(st: PairState, ps: tuple[Parts, Parts]) -> dict[str, torch.Tensor] | None:
    """Each group's ``[2, rows, cols]`` weights as one view of the parameters' own storage, or None when
    the call must use the parameters one by one (compiling, a gradient needed, storage not movable)."""
    if torch.compiler.is_compiling() or st.groups is None:
        return None
    ws = _weights(st.groups, ps)
    if any(w is None for w in ws) or (torch.is_grad_enabled() and any(w.requires_grad for w in ws)):
        return None
    if not _aliased(st.groups, ws):
        if not _movable(st.groups, ws):
            return None
        alias(st.groups, ws)
    out, i = {}, 0
    for g in st.groups:
        first = ws[i]
        out[g.name] = first.as_strided(g.size, (g.size[1] * g.size[2], g.size[2], 1), 0)
        i += len(g.slots)
    return out


# --------------------------------------------------------------------------- the fused pair


def _stacked_bias(ps: tuple[Parts, Parts], names: tuple[str, ...]) -> torch.Tensor | None:
    """``[2, 1, rows]`` biases of a group (zeros where a projection has none), None if none has one."""
    lins = [[p.proj[n] for n in names] for p in ps]
    if all(lin.bias is None for row in lins for lin in row):
        return None
    rows = [
        torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in row])
        for row in lins
    ]
    return torch.stack(rows)[:, None]


def _group(
    x: torch.Tensor, w: torch.Tensor | None, ps: tuple[Parts, Parts], names: tuple[str, ...]
) -> torch.Tensor:
    """``[2, ..., rows]``: layer i's input ``x[i]`` through its projections ``names`` (concatenated)."""
    if w is None:
        return torch.stack([torch.cat([p.proj[n](x[i]) for n in names], -1) for i, p in enumerate(ps)])
    lead = x.shape[1:-1]
    y = torch.matmul(x.reshape(2, -1, x.shape[-1]), w.transpose(1, 2))
    b = _stacked_bias(ps, names)
    return (y if b is None else y + b).view(2, *lead, -1)


def _fused(
    st: PairState, layers: tuple[nn.Module, nn.Module], ps: tuple[Parts, Parts], x: torch.Tensor,
    kw: dict[str, Any],
) -> torch.Tensor:  # fmt: skip
    a = st.adapter
    w = shared(st, ps) or {}
    attn = ps[0].attn
    cfg = attn.config
    hd = attn.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    b, t, _ = x.shape

    normed = torch.stack([_sub(layer, a.attn_norm)(x) for layer in layers])
    qkv = _group(normed, w.get("qkv"), ps, ("q", "k", "v"))  # [2, b, t, (nq + 2 nkv) hd]
    q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)

    def heads(y: torch.Tensor, n: int) -> torch.Tensor:  # [2, b, t, n hd] -> [b, 2 n, t, hd]
        return y.reshape(2, b, t, n, hd).permute(1, 0, 3, 2, 4).reshape(b, 2 * n, t, hd)

    q, k, v = heads(q, nq), heads(k, nkv), heads(v, nkv)
    cos, sin = kw["position_embeddings"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    cache = kw.get(cache_key(attn))
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager_attention_forward)
    extra = {
        k_: v_
        for k_, v_ in kw.items()
        if k_ not in ("position_embeddings", "past_key_values", "cache", "attention_mask")
    }
    out, weights = attention(
        attn,
        q,
        k,
        v,
        kw.get("attention_mask"),
        dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", None),
        **extra,
    )
    out = out.reshape(b, t, 2, nq * hd).permute(2, 0, 1, 3)  # [2, b, t, nq hd]
    o = _group(out, w.get("o"), ps, ("o",))  # [2, b, t, d]
    for i, p in enumerate(ps):  # transformers' output capture (output_attentions): one map per layer
        for hook in tuple(p.attn._forward_hooks.values()):
            hook(p.attn, (), (o[i], None if weights is None else weights[:, i * nq : (i + 1) * nq]))
    h = x + o[0] + o[1]

    normed = torch.stack([_sub(layer, a.mlp_norm)(h) for layer in layers])
    if "gate_up" not in w:  # each layer's own (plain) MLP module
        return h + ps[0].mlp(normed[0]) + ps[1].mlp(normed[1])
    gate, up = _group(normed, w["gate_up"], ps, ("gate", "up")).chunk(2, dim=-1)
    y = _group(_sub(ps[0].mlp, a.act)(gate) * up, w["down"], ps, ("down",))
    return h + y[0] + y[1]


def remove(st: PairState, layers: tuple[nn.Module, nn.Module]) -> None:
    """Undo the shared storage of a fused pair (for ``unmodify``)."""
    if st.groups is not None:
        unalias(st.groups, (parts(st.adapter, layers[0]), parts(st.adapter, layers[1])))
