"""Calibration data: what ``condify.calibrate`` accepts, checked before anything changes, the one
hold-out contract of every method (reported numbers are always on batches nothing trained on), and
:func:`text_batches` (raw text to batches)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .config import ConfigError

Batch = dict[str, torch.Tensor]


class DataError(ValueError):
    """Calibration data is unusable (wrong type, dtype, shape, ids out of range, bad mask, all padding);
    raised before the model is touched."""


_MAX_REPORT = 5
_TOKENIZE = "; tokenise text first: condify.text_batches(tokenizer, texts, seq_len=512)"


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (the valid token ids are ``0..vocab_size - 1``)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return getattr(getattr(model, "config", None), "vocab_size", None)


def as_batches(
    data: Iterable[Any] | torch.Tensor,
    device: torch.device | None = None,
    vocab_size: int | None = None,
    *,
    what: str = "calibration data",
) -> list[Batch]:
    """Normalise calibration data to a list of ``{"input_ids", "attention_mask"?}`` dicts, validated.

    Accepts a (b, t) or (t,) tensor, an iterable of such tensors, or of dicts with ``input_ids`` (and
    optionally ``attention_mask``). Raises :class:`DataError` unless every batch has integer ids of
    shape (b, t) with b, t >= 1 (in ``[0, vocab_size)`` when given), a mask of the same shape with 0/1
    values and at least one real token, and the data has at least one next-token target.
    """
    if data is None or isinstance(data, (str, bytes, dict)):
        raise DataError(
            f"{what}: expected a tensor of input_ids or an iterable of tensors / dicts with 'input_ids', "
            f"got {type(data).__name__}" + (_TOKENIZE if isinstance(data, str) else "")
        )
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise DataError(f"{what}: expected a (batch, tokens) tensor of input_ids, got a scalar")
        data = [data] if data.dim() <= 2 else list(data)
    try:
        items = list(data)
    except TypeError:
        raise DataError(
            f"{what}: expected a tensor of input_ids or an iterable of batches, got {type(data).__name__}"
        ) from None
    out = [check_batch(item, i, vocab_size, what) for i, item in enumerate(items)]
    if not out:
        raise DataError(f"{what} is empty; pass at least one batch of input_ids")
    if not any(_targets(b) for b in out):
        raise DataError(
            f"{what}: no next-token targets (every sequence has fewer than 2 real tokens); pass "
            f"sequences of at least 2 non-padding tokens"
        )
    return [{k: v.to(device) if device is not None else v for k, v in b.items()} for b in out]


def text_batches(
    tokenizer: Any, texts: str | Iterable[str], *, seq_len: int = 512, batch_size: int = 4
) -> list[torch.Tensor]:
    """Calibration batches from raw text: each text tokenised (with the tokenizer's special tokens), the
    texts joined with its EOS token (when it has one), cut into consecutive windows of ``seq_len`` tokens
    (a tail shorter than a window is dropped), ``batch_size`` windows a batch (the last may hold fewer).
    Raises :class:`DataError` when the text is shorter than one window."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise DataError("text_batches: `texts` must be a string or an iterable of strings")
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"text_batches: need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(int(i) for i in tokenizer(text)["input_ids"])
    windows = len(ids) // seq_len
    if windows == 0:
        raise DataError(
            f"text_batches: the text holds {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
            f"pass more text or a smaller seq_len"
        )
    rows = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return list(rows.split(batch_size))


def _targets(b: Batch) -> int:
    """Next-token targets of a batch (pairs of consecutive real tokens)."""
    if "attention_mask" not in b:
        return b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1)
    m = b["attention_mask"].bool()
    return int((m[:, 1:] & m[:, :-1]).sum())


def check_batch(item: Any, i: int, vocab: int | None, what: str) -> Batch:
    where = f"{what}: batch {i}"
    if isinstance(item, torch.Tensor):
        item = {"input_ids": item}
    if not isinstance(item, dict) or "input_ids" not in item:
        raise DataError(
            f"{where}: expected a tensor of input_ids or a dict with 'input_ids', got {type(item).__name__}"
            + (f" with keys {sorted(map(str, item))}" if isinstance(item, dict) else "")
            + (_TOKENIZE if isinstance(item, str) else "")
        )
    b = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask") and v is not None}
    for k, v in b.items():
        if not isinstance(v, torch.Tensor):
            raise DataError(f"{where}: `{k}` must be a torch tensor, got {type(v).__name__}")
    ids = b["input_ids"]
    if ids.dtype not in (torch.int32, torch.int64):
        raise DataError(f"{where}: input_ids must be integer token ids (int64 or int32), got {ids.dtype}")
    if ids.dim() == 1:
        b = {k: v.unsqueeze(0) if v.dim() == 1 else v for k, v in b.items()}
        ids = b["input_ids"]
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(
            f"{where}: input_ids must have shape (batch, tokens) with batch and tokens >= 1, got "
            f"{tuple(ids.shape)}"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        allowed = f"[0, {vocab})" if vocab is not None else ">= 0"
        raise DataError(
            f"{where}: token id {bad} is out of range; ids must be in {allowed} (the model's vocabulary "
            f"size is {vocab}); was the data tokenized with another tokenizer?"
        )
    mask = b.get("attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(ids.shape):
            raise DataError(
                f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; "
                f"they must be the same"
            )
        if mask.is_floating_point() or mask.is_complex():
            raise DataError(
                f"{where}: attention_mask must be an integer or bool tensor of 0/1, got {mask.dtype}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            vals = sorted({int(v) for v in mask.unique()[:10]})
            raise DataError(f"{where}: attention_mask must hold only 0 and 1, got values {vals}")
        if not bool(mask.any()):
            raise DataError(f"{where}: attention_mask is all zeros (only padding); drop the batch")
        if mask.dtype == torch.bool:
            b["attention_mask"] = mask.long()
    return b


def split_holdout(
    batches: list[Batch], holdout: int | Iterable[Any] | None, vocab_size: int | None = None
) -> tuple[list[Batch], list[Batch]]:
    """(fit, held-out) batches, the one hold-out contract of every method.

    ``holdout``: an int ``n`` holds out the last ``n`` batches (0: none); batches (anything
    :func:`as_batches` takes) are held out as given and all of ``batches`` is fit data; ``None`` (the
    default) holds out the last 10 % of the batches, at least one when there are two or more.
    ``vocab_size`` bounds the ids of given hold-out batches (validated like :func:`as_batches`).
    """
    if not batches:
        raise DataError("calibration data is empty; pass at least one batch of input_ids")
    if holdout is None:
        holdout = max(1, round(0.1 * len(batches))) if len(batches) >= 2 else 0
    if isinstance(holdout, (bool, float)):
        raise ConfigError(
            f"calibrate: `holdout` must be a number of batches (int), batches, or None, got {holdout!r}"
        )
    if not isinstance(holdout, int):
        device = batches[0]["input_ids"].device
        return batches, as_batches(holdout, device, vocab_size, what="calibrate: `holdout`")
    if not 0 <= holdout < len(batches):
        raise ConfigError(
            f"calibrate: `holdout={holdout}` must be in [0, {len(batches) - 1}] for {len(batches)} "
            f"batch(es); pass more batches or a smaller hold-out"
        )
    fit, held = (batches[:-holdout], batches[-holdout:]) if holdout else (batches, [])
    for name, part in (("fit", fit), ("held-out", held)):
        if part and not any(_targets(b) for b in part):
            raise DataError(
                f"calibrate: the {len(part)} {name} batch(es) (`holdout={holdout}`) have no next-token "
                f"target (all padding or 1-token sequences); pass more data or another hold-out"
            )
    return fit, held


def real_tokens(batches: Iterable[Batch]) -> int:
    """Non-padding tokens in ``batches``."""
    return sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
    )


def first_tokens(batches: list[Batch], tokens: int) -> list[Batch]:
    """The shortest prefix of ``batches`` with at least ``tokens`` real tokens (all of them if fewer)."""
    out: list[Batch] = []
    for b in batches:
        if real_tokens(out) >= tokens:
            break
        out.append(b)
    return out


def cycle(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches
