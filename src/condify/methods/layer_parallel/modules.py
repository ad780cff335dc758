"""Forward functions for a parallel pair of decoder layers (l, l+1).

``a = x + A_l(N1_l(x)) + A_{l+1}(N1_{l+1}(x))``, ``y = a + M_l(N2_l(a)) + M_{l+1}(N2_{l+1}(a))``.

Layer l runs the pair; layer l+1 passes hidden states through. When the two layers use different
attention types (Gemma-2/3: sliding and full), each needs the mask and rotary embeddings the model
gives it, so layer l passes its input through and leaves its arguments to layer l+1, which runs the
pair (``mixed``). Two execution paths:

- generic: calls each layer's own norm/attention/MLP modules (any adapter; each attention writes its
  own KV-cache slot);
- fused (adapters with ``fusable``): the RMSNorm weights are folded into the projections, so the pair
  is one q|k|v GEMM, one attention call over both layers' heads (KV of both stored in slot l), one
  o-projection, one gate|up GEMM and one down GEMM. The fused weights are derived from the original
  parameters: rebuilt on every call while training, cached (and invalidated on change) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from ...adapters import Adapter
from ...convert import SiteState, cache_key, split_layer_args


@dataclass
class PairState(SiteState):
    """State of a layer in a parallel pair: the first runs both (``partner`` is the second)."""

    kind: ClassVar[str] = "none"  # nothing is skipped per token: not counted by condify.track
    pair: tuple[int, int] = (0, 1)
    adapter: Adapter | None = field(default=None, repr=False)
    partner: nn.Module | None = field(default=None, repr=False)
    fused: bool = False
    mixed: bool = False  # the layers' attention types differ: the second layer runs the pair
    stash: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # first layer's kwargs
    fused_cache: tuple[Any, dict[str, torch.Tensor | None]] | None = field(
        default=None, repr=False, compare=False
    )  # (key, fused weights) for inference; see _cached_fused

    def describe(self) -> dict[str, Any]:
        return {"pair": self.pair, "fused": self.fused, **({"mixed": True} if self.mixed else {})}


def _attn_update(a: Adapter, layer: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = layer.get_submodule(a.attn)(hidden_states=layer.get_submodule(a.attn_norm)(x), **kw)[0]
    return layer.get_submodule(a.attn_post_norm)(out) if a.attn_post_norm else out


def _mlp_update(a: Adapter, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer.get_submodule(a.mlp)(layer.get_submodule(a.mlp_norm)(x))
    return layer.get_submodule(a.mlp_post_norm)(out) if a.mlp_post_norm else out


_DROP = ("encoder_hidden_states", "encoder_attention_mask", "output_attentions")


def _pair(
    a: Adapter, layers: tuple[nn.Module, nn.Module], x: torch.Tensor, kws: tuple[dict, dict]
) -> torch.Tensor:
    h = x + _attn_update(a, layers[0], x, kws[0]) + _attn_update(a, layers[1], x, kws[1])
    return h + _mlp_update(a, layers[0], h) + _mlp_update(a, layers[1], h)


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
        return _fused(self, other, a, x, kw)
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


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _sources(a: Adapter, layers: tuple[nn.Module, nn.Module]) -> list[torch.Tensor]:
    out = []
    for layer in layers:
        attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
        for mod in (layer.get_submodule(a.attn_norm), layer.get_submodule(a.mlp_norm)):
            out.append(mod.weight)
        for name in (a.q, a.k, a.v, a.o):
            out += [p for p in attn.get_submodule(name).parameters()]
        for name in (a.gate, a.up, a.down):
            out += [p for p in mlp.get_submodule(name).parameters()]
    return out


def fused_weights(a: Adapter, first: nn.Module, second: nn.Module) -> dict[str, torch.Tensor | None]:
    """Wide weights of the pair with the norms folded in (differentiable w.r.t. the originals)."""
    pair = (first, second)
    attn = [layer.get_submodule(a.attn) for layer in pair]
    mlp = [layer.get_submodule(a.mlp) for layer in pair]
    g1 = [layer.get_submodule(a.attn_norm).weight + a.norm_offset for layer in pair]
    g2 = [layer.get_submodule(a.mlp_norm).weight + a.norm_offset for layer in pair]

    def rows(mods: list[nn.Module], name: str, gains: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            m.get_submodule(name).weight * g.to(m.get_submodule(name).weight.dtype)
            for m, g in zip(mods, gains, strict=True)
        ]

    def biases(names: tuple[str, ...]) -> torch.Tensor | None:
        lins = [m.get_submodule(n) for n in names for m in attn]
        if all(lin.bias is None for lin in lins):
            return None
        return torch.cat(
            [lin.weight.new_zeros(lin.weight.shape[0]) if lin.bias is None else lin.bias for lin in lins]
        )

    o_b = biases((a.o,))
    half = o_b.shape[0] // 2 if o_b is not None else 0
    return {
        "qkv": torch.cat(rows(attn, a.q, g1) + rows(attn, a.k, g1) + rows(attn, a.v, g1)),
        "qkv_b": biases((a.q, a.k, a.v)),
        "o": torch.cat([m.get_submodule(a.o).weight for m in attn], dim=1),
        "o_b": None if o_b is None else o_b[:half] + o_b[half:],
        "gate_up": torch.cat(rows(mlp, a.gate, g2) + rows(mlp, a.up, g2)),
        "down": torch.cat([m.get_submodule(a.down).weight for m in mlp], dim=1),
    }


def _cached_fused(self: nn.Module, other: nn.Module, a: Adapter) -> dict[str, torch.Tensor | None]:
    if torch.is_grad_enabled() and any(p.requires_grad for p in _sources(a, (self, other))):
        return fused_weights(a, self, other)
    st: PairState = self._condify_patch.state
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in _sources(a, (self, other)))
    if st.fused_cache is None or st.fused_cache[0] != key:
        with torch.no_grad():
            st.fused_cache = (key, fused_weights(a, self, other))
    return st.fused_cache[1]


def _fused(
    self: nn.Module, other: nn.Module, a: Adapter, x: torch.Tensor, kw: dict[str, Any]
) -> torch.Tensor:
    w = _cached_fused(self, other, a)
    attn = self.get_submodule(a.attn)
    cfg = attn.config
    hd = attn.head_dim
    nq, nkv = 2 * cfg.num_attention_heads, 2 * cfg.num_key_value_heads
    b, t, _ = x.shape

    qkv = F.linear(_rms(x, _eps(self.get_submodule(a.attn_norm))), w["qkv"], w["qkv_b"])
    q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(b, t, nq, hd).transpose(1, 2)
    k = k.view(b, t, nkv, hd).transpose(1, 2)
    v = v.view(b, t, nkv, hd).transpose(1, 2)
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
    out, _ = attention(
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
    h = x + F.linear(out.reshape(b, t, -1), w["o"], w["o_b"])
    gate, up = F.linear(_rms(h, _eps(self.get_submodule(a.mlp_norm))), w["gate_up"]).chunk(2, dim=-1)
    act = self.get_submodule(a.mlp).get_submodule(a.act)
    return h + F.linear(act(gate) * up, w["down"])
