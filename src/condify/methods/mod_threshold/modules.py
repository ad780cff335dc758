"""Forward of a gated decoder layer (mod-threshold).

Gate: ``g = sigmoid(w·h + b)`` per token on the layer input ``h``; the token takes the layer iff
``g >= threshold`` (a NaN gate counts as kept, so bad inputs propagate instead of silently skipping).
Padding tokens (from the 2-D ``attention_mask`` given to the model) never take a gated layer, so they
write no K/V. Kept tokens see only the tokens this layer kept (cached ones included), causally, at
their original positions; skipped tokens pass through unchanged and write no K/V.

The gate scales the residual updates in the straight-through form ``g_used = hard + (g - g.detach())``
(``hard`` = 1 kept, 0 skipped): the value is exactly 0/1, so the output is dense at init (``w = 0``,
``b = init_bias`` keeps every token) and the router still gets ``dL/dg = <dL/dout, update>``.

Two execution paths with the same values:

- masked (the oracle, and every training forward): every token is computed, keys are restricted to
  kept tokens, updates of skipped tokens are multiplied by 0;
- gathered (inference, ``mode="gather"``): kept tokens are compacted per sequence
  (:func:`condify.ops.compact_tokens`), run through the layer with their own rotary embeddings,
  and their updates added back (:func:`condify.ops.scatter_tokens`). Both ops run Triton kernels on
  CUDA without host sync; the layer itself syncs once (``count.max()``) to size the compacted batch.
  With no cached keys yet (prefill) and sdpa, the compacted rows use sdpa's causal kernel, no mask.

Under ``torch.compile`` (``fullgraph=True`` included) and on the meta device the masked path runs
whatever ``mode`` says: its shapes do not depend on the routing (no ``.item()``, no host sync), its
values are the gathered path's, but every token is computed (no compute is saved while compiled). The
ragged cache then appends every new row and marks the skipped ones empty (see :mod:`condify.cache`).
``condify.track`` counts with a host sync: track eager runs, not compiled ones.

KV caches: ``DynamicCache`` (what ``generate`` creates; upgraded in place to
:class:`condify.cache.RaggedCache`) or a ``RaggedCache``. ``StaticCache`` (``cache_implementation="static"``)
and other fixed-size caches are refused with :class:`condify.cache.UnsupportedCacheError` before any layer
runs: gated layers store only the tokens they keep. Use the dynamic cache (``generate``'s default;
with ``torch.compile``, compile ``model.forward`` and pass a ``DynamicCache``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...adapters import Adapter
from ...cache import check_cache, ragged_layer
from ...patching import SiteState, bind_args, cache_key, check_finite, split_layer_args
from .config import ModThresholdConfig

_DROP = ("encoder_hidden_states", "encoder_attention_mask", "output_attentions", "use_cache")
_CACHE_ARGS = ("cache", "past_key_values")  # the decoder stack's cache argument, by transformers version


class RouterState:
    """Runtime state shared by the gated layers of one model (never saved).

    ``mask2d``: the 2-D padding mask of the current forward, captured by a pre-hook on the decoder
    stack. ``record``: when a dict, each gated layer stores ``(logits, keep, real, forced)`` of its last call
    (``forced``: the sink tokens, or None).
    ``fit`` and ``keep_all`` serve calibration (see :mod:`.calibrate`).
    """

    def __init__(self) -> None:
        self.mask2d: torch.Tensor | None = None
        self._rank: torch.Tensor | None = None  # index among the real tokens, once per forward
        self.record: dict[int, tuple[torch.Tensor, ...]] | None = None
        self.fit: float | None = None  # capacity to fit router biases to, during one forward
        self.keep_all = False  # route every token (dense), e.g. to collect activations
        self.handle: RemovableHandle | None = None  # of the capture pre-hook, removed by ``remove``

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook (``with_kwargs=True``) on the module that owns the layer list: takes the 2-D
        padding mask and checks the KV cache (before any layer writes to it)."""
        named = bind_args(module, args, kwargs) if args else kwargs
        for name in _CACHE_ARGS:
            check_cache(named.get(name))
        mask = named.get("attention_mask")
        self.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._rank = None if self.mask2d is None else self.mask2d.ne(0).long().cumsum(1) - 1

    def real_tokens(self, b: int, t: int, device: torch.device) -> torch.Tensor | None:
        """(B, T) True for non-padding tokens of the current call, or None if unknown / no padding."""
        m = self.mask2d
        if m is None or m.shape[0] != b or m.shape[1] < t:
            return None
        return m[:, -t:].to(device) != 0

    def rank(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, T) index of each token among the real tokens of its sequence (``slots`` if unknown)."""
        r, (b, t) = self._rank, slots.shape
        if r is None or r.shape[0] != b or r.shape[1] < t:
            return slots
        return r[:, -t:].to(slots.device)


@dataclass
class GatedState(SiteState):
    """State of one gated decoder layer (its router is the child ``router``)."""

    config: ModThresholdConfig | None = field(default=None, repr=False)
    adapter: Adapter | None = field(default=None, repr=False)
    shared: RouterState | None = field(default=None, repr=False)  # one per model
    sliding_window: int | None = None
    keep_rate: float | None = None  # measured on held-out text by calibrate

    def describe(self) -> dict[str, Any]:
        return {} if self.keep_rate is None else {"keep_rate": self.keep_rate}


@functools.cache
def _ops() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:
        from ...ops import compact_tokens, scatter_tokens

        return compact_tokens, scatter_tokens
    except ImportError:  # ops dispatcher not available: the plain-torch reference
        from ...ops.reference import compact_tokens_reference, scatter_tokens_reference

        return compact_tokens_reference, scatter_tokens_reference


def quantile_shift(
    logits: torch.Tensor,
    real: torch.Tensor | None,
    capacity: float,
    threshold: float,
    forced: torch.Tensor | None = None,
) -> float:
    """Logit shift after which a fraction ``capacity`` of the (real) tokens is kept, i.e. has
    ``sigmoid >= threshold`` or is ``forced`` (sink tokens, kept whatever their gate)."""
    target = math.log(threshold / (1 - threshold))
    if forced is not None:
        n = logits.numel() if real is None else int(real.sum())
        fixed = int(forced.sum() if real is None else (forced & real).sum())
        capacity = (capacity * n - fixed) / max(n - fixed, 1)
        real = ~forced if real is None else real & ~forced
    z = logits[real] if real is not None else logits.flatten()
    if z.numel() == 0:
        return 0.0
    if capacity >= 1.0:
        return max(0.0, target - float(z.min()) + 1e-3)
    if capacity <= 0.0:
        return target - float(z.max()) - 1e-3
    return target - float(torch.quantile(z.double(), 1 - capacity))


def _mask(
    qs: torch.Tensor, ks: torch.Tensor, kvalid: torch.Tensor, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive (B, 1, Q, S) mask: query slot ``qs`` sees valid key slots ``ks <= qs`` (in window), and itself."""
    q, k = qs[:, :, None], ks[:, None, :]
    allowed = kvalid[:, None, :] & (k <= q)
    if window is not None:
        allowed &= q - k < window
    allowed |= k == q  # every row has a key; only rows whose output is discarded rely on it
    mask = torch.zeros(allowed.shape, dtype=dtype, device=qs.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _updates(
    layer: nn.Module,
    a: Adapter,
    x: torch.Tensor,
    gate: torch.Tensor | None,
    attn_kwargs: dict[str, Any],
) -> torch.Tensor:
    """The layer's output ``x + g·attn, then + g·mlp`` (``gate`` None = 1)."""
    out = a.attn_update(layer, x, **attn_kwargs)
    h = x + (out if gate is None else gate * out)
    out = a.mlp_update(layer, h)
    return h + (out if gate is None else gate * out)


def gated_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a gated decoder layer (installed as an instance method)."""
    st: GatedState = self._condify_patch.state
    cfg, a, state = st.config, st.adapter, st.shared
    x, kw = split_layer_args(self, args, kwargs)
    for k in _DROP:
        kw.pop(k, None)
    attn = self.get_submodule(a.attn)
    idx: int = attn.layer_idx
    window = st.sliding_window
    if cfg.debug_checks:
        check_finite(f"mod-threshold layer {idx}: hidden states", x)
    b, t, _ = x.shape
    ck = cache_key(attn)
    cache = kw.pop(ck, None)
    kw.pop("attention_mask", None)
    kw.pop("position_ids", None)  # rotary comes in position_embeddings
    cos, sin = kw.pop("position_embeddings")
    layer_cache = ragged_layer(cache, idx, window) if cache is not None else None
    past = layer_cache.seen if layer_cache is not None else 0
    slots = (torch.arange(t, device=x.device) + past).expand(b, t)

    real = state.real_tokens(b, t, x.device)
    # sink tokens: the first real tokens of each sequence, wherever padding puts them
    forced = state.rank(slots) < cfg.sink_tokens if cfg.sink_tokens else None
    logits = self.router(x).squeeze(-1).float()
    if state.fit is not None:  # calibration: move the bias so a fraction `fit` of the tokens is kept
        shift = quantile_shift(logits.detach(), real, state.fit, cfg.threshold, forced)
        with torch.no_grad():
            self.router.bias += shift
        logits = logits + shift
    g = torch.sigmoid(logits)
    keep = ~(g < cfg.threshold)
    if forced is not None:
        keep = keep | forced
    if state.keep_all:
        keep = torch.ones_like(keep)
    if real is not None:
        keep = keep & real
    if state.record is not None:
        state.record[idx] = (logits, keep, real, forced)
    if st.counter is not None:
        st.count(keep.sum(), keep.numel() if real is None else real.sum())

    # compiled or on meta: the masked path, whose shapes do not depend on the routing (no host sync)
    static = torch.compiler.is_compiling() or x.device.type == "meta"
    if cfg.mode == "mask" or (self.training and torch.is_grad_enabled()) or static:
        gate = keep.to(x.dtype)
        if g.requires_grad:
            gate = gate + (g - g.detach()).to(x.dtype)
        ks, kvalid = layer_cache.prepare(slots, keep, t) if layer_cache is not None else (slots, keep)
        kw.update(
            position_embeddings=(cos, sin),
            attention_mask=_mask(slots, ks, kvalid, window, x.dtype),
        )
        kw[ck] = cache if layer_cache is not None else None
        return _updates(self, a, x, gate[..., None], kw)

    compact_tokens, scatter_tokens = _ops()
    index, count = compact_tokens(keep)
    k = int(count.max())
    if k == 0:
        if layer_cache is not None:
            layer_cache.skip(t)
        return x
    index = index[:, :k]
    valid = torch.arange(k, device=x.device) < count[:, None]

    def rows(v: torch.Tensor) -> torch.Tensor:
        v = v.expand(b, *v.shape[1:])
        return v.gather(1, index.view(b, k, *([1] * (v.dim() - 2))).expand(b, k, *v.shape[2:]))

    xg, qs = rows(x), rows(slots)
    if layer_cache is not None:
        ks, kvalid = layer_cache.prepare(qs, valid, t)
    else:
        ks, kvalid = qs, valid
    fast = (
        attn.config._attn_implementation == "sdpa"
        and (layer_cache is None or ks.shape[1] == k)  # nothing cached yet: causal over the compacted rows
        and (window is None or window >= past + t)
    )
    kw.update(
        position_embeddings=(rows(cos), rows(sin)),
        attention_mask=None if fast else _mask(qs, ks, kvalid, window, x.dtype),
    )
    kw[ck] = cache if layer_cache is not None else None
    out = _updates(self, a, xg, None, kw)
    return scatter_tokens(x, out - xg, index, count)
