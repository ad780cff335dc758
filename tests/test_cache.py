"""condify.cache: ragged per-sequence K/V for gated layers, against a naive per-row list oracle."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from condify.cache import RaggedCache, RaggedLayer, cache_nbytes, ragged_layer


def _fill(layer: RaggedLayer, steps: list[torch.Tensor], h: int = 2, d: int = 3) -> list[list[tuple]]:
    """Feed ``steps`` (each a (B, N) keep mask) and return the naive per-row oracle of what was stored."""
    b = steps[0].shape[0]
    oracle: list[list[tuple]] = [[] for _ in range(b)]
    for valid in steps:
        n = valid.shape[1]
        slots = (torch.arange(n) + layer.seen).expand(b, n)
        k = torch.randn(b, h, n, d)
        v = torch.randn(b, h, n, d)
        ks, kvalid = layer.prepare(slots, valid, n)
        keys, values = layer.update(k, v)
        assert keys.shape[2] == ks.shape[1] == kvalid.shape[1]
        torch.testing.assert_close(keys[:, :, -n:], k)  # the new rows come last, all of them
        for row in range(b):
            for j in range(n):
                if valid[row, j]:
                    oracle[row].append((int(slots[row, j]), k[row, :, j], v[row, :, j]))
    return oracle


def _check(layer: RaggedLayer, oracle: list[list[tuple]]) -> None:
    for row, entries in enumerate(oracle):
        n = len(entries)
        assert int(layer.kept_tokens()[row]) == n
        assert layer.slots[row, :n].tolist() == [s for s, _, _ in entries]
        assert (layer.slots[row, n:] == -1).all()
        for j, (_, k, v) in enumerate(entries):
            assert torch.equal(layer.keys[row, :, j], k) and torch.equal(layer.values[row, :, j], v)


def test_ragged_append_matches_naive_oracle() -> None:
    torch.manual_seed(0)
    layer = RaggedLayer()
    steps = (
        [torch.rand(3, 7) < 0.5]
        + [torch.rand(3, 1) < 0.5 for _ in range(6)]
        + [torch.zeros(3, 2, dtype=torch.bool)]
    )
    oracle = _fill(layer, steps)
    _check(layer, oracle)
    assert layer.get_seq_length() == 7 + 6 + 2
    assert layer.get_mask_sizes(1) == (16, 0)
    assert layer.keys.shape[2] == max(len(o) for o in oracle)
    assert layer.nbytes() == 2 * layer.keys.numel() * 4 + layer.slots.numel() * 8


def test_batch_ops_and_crop() -> None:
    torch.manual_seed(1)
    layer = RaggedLayer()
    oracle = _fill(layer, [torch.rand(4, 9) < 0.6, torch.rand(4, 1) < 0.6])
    idx = torch.tensor([2, 0])
    layer.batch_select_indices(idx)
    _check(layer, [oracle[2], oracle[0]])
    layer.batch_repeat_interleave(2)
    _check(layer, [oracle[2], oracle[2], oracle[0], oracle[0]])
    layer.crop(-3)
    assert layer.get_seq_length() == 7
    _check(layer, [[e for e in o if e[0] < 7] for o in (oracle[2], oracle[2], oracle[0], oracle[0])])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0


def test_skip_advances_length_without_storing() -> None:
    layer = RaggedLayer()
    layer.skip(5)
    assert layer.get_seq_length() == 5 and layer.nbytes() == 0
    oracle = _fill(layer, [torch.tensor([[True, False, True]])])
    assert [s for s, _, _ in oracle[0]] == [5, 7]
    _check(layer, oracle)


def test_update_without_prepare_is_refused() -> None:
    with pytest.raises(RuntimeError, match="prepare"):
        RaggedLayer().update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_sliding_mask_sizes_match_dynamic_sliding_layer() -> None:
    layer = RaggedLayer(sliding_window=4)
    layer.skip(6)
    assert layer.is_sliding and layer.get_mask_sizes(1) == (4, 3)


def test_upgrade_plain_dynamic_cache_in_place() -> None:
    cache = DynamicCache()
    layer = ragged_layer(cache, 2, None)
    assert type(cache) is RaggedCache and cache.layers[2] is layer and len(cache.layers) == 3
    assert all(type(x) is DynamicLayer for x in cache.layers[:2])
    assert ragged_layer(cache, 2, None) is layer
    cache.update(torch.ones(1, 2, 4, 3), torch.ones(1, 2, 4, 3), 0)
    dense_bytes = 2 * 2 * 4 * 3 * 4
    assert cache.condify_nbytes() == cache_nbytes(cache) == dense_bytes
    with pytest.raises(TypeError, match="dense K/V"):
        ragged_layer(cache, 0, None)


def test_static_cache_refused() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    with pytest.raises(TypeError, match="dynamic KV cache"):
        ragged_layer(StaticCache(config=cfg, max_cache_len=8), 1, None)
