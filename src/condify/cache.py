"""A KV cache whose gated layers hold ragged, per-sequence K/V: only the tokens a layer kept.

:class:`RaggedLayer` stores, for one decoder layer, the K/V of the tokens that layer processed,
left-aligned per sequence in a ``(batch, heads, L, head_dim)`` buffer with ``slots`` ``(batch, L)``:
each stored token's index in the dense sequence (``-1`` = empty). ``L`` is the largest number of
kept tokens over the batch, so skipped tokens cost no memory (at batch 1 exactly; at batch > 1 the
rows are padded to the longest one). Sliding-window layers keep their kept tokens too (the window
is applied by the attention mask), so the bytes are an upper bound there.

:class:`RaggedCache` is a ``DynamicCache`` whose gated layers are ``RaggedLayer`` s; the other
layers behave exactly as in ``DynamicCache``. Gated layers upgrade a plain, still-empty
``DynamicCache`` in place on first use (:func:`ragged_layer`), which is how ``model.generate()``
ends up with this cache without any option: ``generate`` creates a ``DynamicCache`` and the first
forward turns it into a ``RaggedCache`` (under ``torch.compile`` the class is left as it is, since
dynamo cannot trace a ``__class__`` assignment: the layers are ragged all the same).

Under ``torch.compile`` and on the meta device a ragged layer appends every new row (shapes that do
not depend on the routing) and marks the rows it did not keep empty (slot ``-1``): the same keys are
valid, only the skipped rows' memory is not saved. Eager appends after that stay correct (rows need
not be left-aligned, only stored in increasing slot order).

Fixed-size caches (``StaticCache``, ``cache_implementation="static"``) cannot hold ragged layers and are
refused with :class:`UnsupportedCacheError` (:func:`check_cache`); use ``DynamicCache`` or
:class:`RaggedCache`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .config import ConfigError

__all__ = [
    "RaggedCache",
    "RaggedLayer",
    "UnsupportedCacheError",
    "cache_nbytes",
    "check_cache",
    "ragged_layer",
]


class UnsupportedCacheError(ConfigError, TypeError):
    """A KV cache a mod-threshold model cannot fill (e.g. ``StaticCache``); raised before any layer
    writes to it."""


def _static_shapes(t: torch.Tensor) -> bool:
    """Whether shapes must not depend on values: while compiling, or for meta tensors."""
    return torch.compiler.is_compiling() or t.device.type == "meta"


class RaggedLayer(DynamicLayer):
    """Ragged K/V of one gated layer. Call :meth:`prepare` before each ``update``.

    ``get_seq_length`` reports the number of *dense* tokens seen (as a ``DynamicLayer`` would), so
    ``generate`` and the model's mask sizes are unchanged; the gated layer builds its own mask
    from :attr:`slots`.
    """

    def __init__(self, sliding_window: int | None = None, **kwargs) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0
        self.slots: torch.Tensor | None = None  # (B, L) int64, -1 = empty
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # -- the gated layer's side -------------------------------------------------------------------
    def prepare(
        self, slots: torch.Tensor, valid: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Announce the next ``update``: its rows' dense ``slots`` (B, N), which to store (``valid``)
        and how many dense tokens the forward covers (``num_tokens``, >= N).

        Returns ``(key_slots, key_valid)`` (B, L + N) describing the keys ``update`` will return:
        the stored tokens, then all N new rows.
        """
        b = slots.shape[0]
        old = self.slots if self.slots is not None else slots.new_full((b, 0), -1)
        self._pending = (slots, valid, num_tokens)
        return torch.cat([old, slots], 1), torch.cat([old >= 0, valid], 1)

    def skip(self, num_tokens: int) -> None:
        """Advance the dense length by ``num_tokens`` tokens that this layer skipped entirely."""
        self.seen += num_tokens

    # -- the Cache API ---------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None:
            raise RuntimeError(
                "RaggedLayer.update called without prepare(): this cache layer belongs to a "
                "mod-threshold gated layer and can only be filled by it"
            )
        slots, valid, num_tokens = self._pending
        self._pending = None
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.keys = key_states.new_zeros(b, h, 0, d)
            self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
            self.slots = slots.new_full((b, 0), -1)
        out = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        self._append(key_states, value_states, slots, valid)
        self.seen += num_tokens
        return out

    def _append(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> None:
        if _static_shapes(k):  # every row, the skipped ones marked empty
            self.keys, self.values = torch.cat([self.keys, k], -2), torch.cat([self.values, v], -2)
            self.slots = torch.cat([self.slots, torch.where(valid, slots, -1)], 1)
            return
        cols = torch.arange(1, self.slots.shape[1] + 1, device=self.slots.device)
        used = torch.where(self.slots >= 0, cols, 0)
        length = used.amax(1) if used.shape[1] else used.new_zeros(used.shape[0])  # (B,) columns in use
        new_len = length + valid.sum(1)
        size = int(new_len.max()) if new_len.numel() else 0
        dest = torch.where(valid, length[:, None] + valid.long().cumsum(1) - 1, size)  # dump col = size
        b, h, n, d = k.shape
        old = self.keys.shape[-2]

        def grow(buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            out = buf.new_zeros(b, h, size + 1, buf.shape[-1])
            out[:, :, : min(old, size)] = buf[:, :, : min(old, size)]
            idx = dest[:, None, :, None].expand(b, h, n, buf.shape[-1])
            return out.scatter(2, idx, new)[:, :, :size]

        self.keys, self.values = grow(self.keys, k), grow(self.values, v)
        s = self.slots.new_full((b, size + 1), -1)
        s[:, : min(old, size)] = self.slots[:, : min(old, size)]
        self.slots = s.scatter(1, dest, slots)[:, :size]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        w = self.sliding_window
        if w is None:
            return self.seen + query_length, 0
        offset = max(self.seen - w + 1, 0)
        return (w - 1 if self.seen >= w else self.seen) + query_length, offset

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen, self.slots, self._pending = 0, None, None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("RaggedLayer.crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.seen -= abs(tokens_to_remove)
        keep = (self.slots >= 0) & (self.slots < self.seen)
        self._filter(keep)

    def _filter(self, keep: torch.Tensor) -> None:
        """Keep only the entries where ``keep``; rows stay left-aligned (stored slots are increasing)."""
        size = int(keep.sum(1).max()) if keep.numel() else 0
        order = torch.argsort((~keep).long(), dim=1, stable=True)[:, :size]
        self.slots = torch.where(keep.gather(1, order), self.slots.gather(1, order), -1)
        idx = order[:, None, :, None]
        self.keys = self.keys.gather(2, idx.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, idx.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.slots = self.slots.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.keys.device)
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.slots = self.slots[indices]
            self._filter(self.slots >= 0)

    def nbytes(self) -> int:
        """Bytes held by this layer (K, V and the slot index)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.slots))

    def kept_tokens(self) -> torch.Tensor:
        """Number of stored tokens per sequence, (B,)."""
        if self.slots is None:
            return torch.zeros(0, dtype=torch.long)
        return (self.slots >= 0).sum(1)


def cache_nbytes(cache: Cache) -> int:
    """Bytes of K/V held by any transformers cache (ragged layers counted as stored)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            total += layer.nbytes()
        elif getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


class RaggedCache(DynamicCache):
    """``DynamicCache`` with :class:`RaggedLayer` at the gated layers (created on first use)."""

    def condify_nbytes(self) -> int:
        """Bytes of K/V actually held, for :func:`condify.evaluate.kv_cache_bytes`."""
        return cache_nbytes(self)


def check_cache(cache: Any) -> None:
    """Raise :class:`UnsupportedCacheError` unless ``cache`` is None or a dynamic cache (``DynamicCache``,
    :class:`RaggedCache`): fixed-size caches (``StaticCache``, ...) cannot store ragged layers."""
    if cache is None or isinstance(cache, DynamicCache):
        return
    raise UnsupportedCacheError(
        f"mod-threshold needs a dynamic KV cache (DynamicCache or condify.cache.RaggedCache); got "
        f"{type(cache).__name__}, whose layers have a fixed size, while gated layers store only the tokens "
        f"they keep. Use generate()'s default cache (no cache_implementation='static'), or pass "
        f"past_key_values=condify.cache.RaggedCache(); to compile, compile model.forward and pass a "
        f"DynamicCache"
    )


def ragged_layer(cache: Cache, layer_idx: int, sliding_window: int | None) -> RaggedLayer:
    """The ragged layer ``layer_idx`` of ``cache``, upgrading a plain, still-empty dynamic cache in place.

    A plain ``DynamicCache`` becomes a :class:`RaggedCache` (same object, class swapped; its other
    layers are untouched). A layer that already holds dense K/V, or a cache of another kind (e.g.
    static), is refused: mod-threshold needs the dynamic cache.
    """
    check_cache(cache)
    if type(cache) is DynamicCache and not torch.compiler.is_compiling():
        cache.__class__ = RaggedCache
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, RaggedLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise TypeError(
            f"cache layer {layer_idx} already holds dense K/V ({type(layer).__name__}); a cache filled by "
            f"the dense model cannot be continued by a mod-threshold model"
        )
    ragged = RaggedLayer(sliding_window=getattr(layer, "sliding_window", sliding_window))
    cache.layers[layer_idx] = ragged
    return ragged
