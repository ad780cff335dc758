"""Measurement: perplexity, executed FLOPs, KV-cache bytes, prefill/decode timers.

Everything here is meant to be reported as a ratio to the dense model measured in the same process
on the same inputs (see :func:`flops_ratio` and :func:`compare_speed`).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .environment import device_name, environment, set_threads

__all__ = [
    "FLOP_GROUPS",
    "compare_speed",
    "device_name",
    "environment",
    "executed_flops",
    "flops_ratio",
    "kv_cache_bytes",
    "model_bytes",
    "output_cache",
    "perplexity",
    "prefill_kv_bytes",
    "set_threads",
    "time_decode",
    "time_prefill",
    "token_nlls",
]

FLOP_GROUPS = ("attention", "mlp", "lm_head", "other", "total")

Batch = torch.Tensor | Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_ids(input_ids: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D (batch, seq_len) integer tensor")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids must hold at least one token per sequence")
    return input_ids.to(_device(model))


# --------------------------------------------------------------------------- quality


def perplexity(model: nn.Module, batches: Iterable[Batch], *, progress: bool = True) -> float:
    """``exp`` of the token-weighted mean next-token NLL over ``batches`` (of :func:`token_nlls`)."""
    return float(token_nlls(model, batches, progress=progress).mean().exp())


def token_nlls(model: nn.Module, batches: Iterable[Batch], *, progress: bool = True) -> torch.Tensor:
    """The next-token NLL of every scored target of ``batches``, in order (1-D, float64).

    Each batch is an ``input_ids`` tensor ``(b, s)`` or a mapping with ``input_ids`` and optionally
    ``attention_mask`` (0 = padding) and ``labels`` (-100 = ignored). A target counts when it and
    the token predicting it are both real; with padding, position ids follow the mask (as in
    ``generate``). Runs under ``torch.inference_mode`` in eval mode (the previous mode is restored).
    """
    from tqdm.auto import tqdm

    device = _device(model)
    nlls: list[torch.Tensor] = []
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise ValueError("perplexity needs at least one batch")
    with _eval_mode(model), torch.inference_mode():
        for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
            if isinstance(batch, torch.Tensor):
                input_ids, mask, labels = batch, None, None
            elif isinstance(batch, Mapping):
                if "input_ids" not in batch:
                    raise ValueError("a batch mapping must contain 'input_ids'")
                input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
            else:
                raise TypeError(f"a batch must be a tensor or a mapping, got {type(batch).__name__}")
            input_ids = _as_ids(input_ids, model)
            kwargs: dict[str, Any] = {"use_cache": False}
            targets = (labels.to(device) if labels is not None else input_ids)[:, 1:]
            valid = targets != -100
            if mask is not None:
                mask = mask.to(device)
                if mask.shape != input_ids.shape:
                    raise ValueError(
                        f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(input_ids.shape)}"
                    )
                kwargs["attention_mask"] = mask
                real = mask.bool()
                valid &= real[:, 1:] & real[:, :-1]
                if not bool(real.all()) and _accepts(model, "position_ids"):
                    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids, **kwargs).logits[:, :-1]
            for row in range(logits.shape[0]):  # per row: keeps the fp32 copy of the logits small
                keep = valid[row]
                if not bool(keep.any()):
                    continue
                nll = torch.nn.functional.cross_entropy(
                    logits[row][keep].float(), targets[row][keep].long(), reduction="none"
                )
                nlls.append(nll.double().cpu())
    if not nlls:
        raise ValueError("no target tokens to score (all masked or sequences of length 1)")
    return torch.cat(nlls)


# --------------------------------------------------------------------------- FLOPs

_ATTENTION_SEGMENT = re.compile(r"(^|_)(attn|attention)($|_)")
_MLP_SEGMENT = re.compile(r"(^|_)(mlp|ffn|feed_forward|moe)($|_)")


def _group_of(segment: str) -> str | None:
    if segment == "lm_head":
        return "lm_head"
    if _ATTENTION_SEGMENT.search(segment):
        return "attention"
    if _MLP_SEGMENT.search(segment):
        return "mlp"
    return None


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_mapping() -> dict[Any, Any]:
    """FLOP formulas that ``FlopCounterMode`` lacks: the CPU fused SDPA kernel (torch 2.13)."""
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_flash_attention_flop
    return mapping


def executed_flops(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    custom_mapping: Mapping[Any, Any] | None = None,
) -> dict[str, float]:
    """FLOPs executed by one forward (``use_cache=False``), grouped by block type.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` from the aten ops that really ran
    (mm/addmm/bmm/baddbmm/conv and the SDPA kernels), so tokens or experts a method skips are not
    counted. Elementwise work (norms, activations, RoPE, softmax, routing top-k) is not counted.
    SDPA counts the full ``s_q x s_k`` score matrix (causal masking is not discounted); on CPU the
    fused ``_scaled_dot_product_flash_attention_for_cpu`` kernel, which torch does not count, is
    added here with the same formula. Ops wrapped with ``torch.library.custom_op`` count 0 unless a
    formula is registered (``torch.utils.flop_counter.register_flop_formula``) or passed in
    ``custom_mapping``.

    The first module-path segment that names attention (``self_attn``, ``attn``, ``attention``,
    ``*_attn``), an MLP (``mlp``, ``ffn``, ``feed_forward``, ``*_moe``) or ``lm_head`` decides
    the group; everything else (routers outside those blocks, embeddings) is ``other``.
    Returns ``{"attention", "mlp", "lm_head", "other", "total"}`` as floats.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .hooks import observing
    from .ops._dispatch import register_flop_formulas

    register_flop_formulas()  # condify's custom ops (the Triton kernels) would otherwise count as 0
    input_ids = _as_ids(input_ids, model)
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(input_ids.device)
    mapping = {**_sdpa_mapping(), **(custom_mapping or {})}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with _eval_mode(model), torch.inference_mode(), observing(counter):  # its module tracker only watches
        model(input_ids=input_ids, **kwargs)
    counts = counter.get_flop_counts()
    total = float(sum(counts.get("Global", {}).values()))
    groups = dict.fromkeys(("attention", "mlp", "lm_head"), 0.0)
    seen: set[str] = set()
    for path in counts:
        if path == "Global":
            continue
        segments = path.split(".")[1:]  # the first segment is the root module's class name
        for i, segment in enumerate(segments):
            group = _group_of(segment)
            if group is None:
                continue
            prefix = ".".join(segments[: i + 1])
            if prefix not in seen:  # outermost matching module only: no double counting
                seen.add(prefix)
                module_key = ".".join(path.split(".")[: i + 2])
                groups[group] += float(sum(counts.get(module_key, {}).values()))
            break
    other = total - sum(groups.values())
    return {**groups, "other": max(other, 0.0), "total": total}


def flops_ratio(modified: nn.Module, dense: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Per-group ratio of :func:`executed_flops` of ``modified`` to ``dense`` (nan where dense is 0)."""
    mod = executed_flops(modified, input_ids)
    ref = executed_flops(dense, input_ids)
    return {k: (mod[k] / ref[k] if ref[k] else float("nan")) for k in FLOP_GROUPS}


# --------------------------------------------------------------------------- memory


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def output_cache(out: Any) -> Any:
    """The KV cache of a model or ``generate`` output (``cache`` since transformers 5.24, else
    ``past_key_values``), or None."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return next((out[k] for k in ("cache", "past_key_values") if k in keys), None)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache's key/value tensors.

    Uses ``cache.condify_nbytes()`` when the cache defines it (ragged condify caches); else sums
    ``.keys`` / ``.values`` over ``cache.layers`` (transformers 5 ``Cache``); legacy tuples of
    ``(k, v)`` per layer are summed too. ``None`` is 0 bytes.
    """
    if cache is None:
        return 0
    nbytes = getattr(cache, "condify_nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(
            _tensor_bytes(getattr(layer, "keys", None)) + _tensor_bytes(getattr(layer, "values", None))
            for layer in layers
        )
    if isinstance(cache, (tuple, list)):
        return _tensor_bytes(cache)
    raise TypeError(f"don't know how to measure a cache of type {type(cache).__name__}")


def prefill_kv_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """KV-cache bytes after a prefill of ``input_ids`` with ``use_cache=True``."""
    input_ids = _as_ids(input_ids, model)
    with _eval_mode(model), torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True, **_last_logits_only(model))
    return kv_cache_bytes(output_cache(out))


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- timing


def _last_logits_only(model: nn.Module) -> dict[str, Any]:
    return {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}


def _prefill_once(model: nn.Module, input_ids: torch.Tensor) -> float:
    device = input_ids.device
    mask = torch.ones_like(input_ids)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=input_ids, attention_mask=mask, use_cache=True, **_last_logits_only(model))
    _sync(device)
    return time.perf_counter() - start


def _generate_once(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int, return_cache: bool = False
) -> Any:
    device = input_ids.device
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    if return_cache:
        kwargs["return_dict_in_generate"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        _sync(device)
        elapsed = time.perf_counter() - start
    if return_cache:
        return out
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(
            f"generate produced {out.shape[1] - input_ids.shape[1]} tokens instead of {new_tokens}"
        )
    return elapsed


def _decode_rate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of the decode steps only: generate(N) minus generate(1) (= prefill), same prompt."""
    t1 = _generate_once(model, input_ids, 1)
    tn = _generate_once(model, input_ids, new_tokens)
    return input_ids.shape[0] * (new_tokens - 1) / max(tn - t1, 1e-9)


def _check_counts(repeats: int, warmup: int, new_tokens: int | None = None) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if new_tokens is not None and new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (one prefill token + decode steps), got {new_tokens}")


def time_prefill(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one prefill forward (``use_cache=True``, logits of the last token only)."""
    _check_counts(repeats, warmup)
    input_ids = _as_ids(input_ids, model)
    times = []
    with _eval_mode(model), torch.inference_mode():
        for i in range(warmup + repeats):
            t = _prefill_once(model, input_ids)
            if i >= warmup:
                times.append(t)
    return statistics.median(times)


def time_decode(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3, warmup: int = 1
) -> float:
    """Median decode throughput in tokens/s (all sequences of the batch), prefill excluded.

    Each repeat times greedy ``generate`` of ``new_tokens`` and of 1 token (``min_new_tokens`` set
    so EOS cannot stop early) on the same prompt; the difference is ``new_tokens - 1`` decode steps
    through the model's own cache, so ``rate = batch * (new_tokens - 1) / (t_N - t_1)``.
    """
    _check_counts(repeats, warmup, new_tokens)
    input_ids = _as_ids(input_ids, model)
    rates = []
    with _eval_mode(model), torch.inference_mode():
        for i in range(warmup + repeats):
            r = _decode_rate(model, input_ids, new_tokens)
            if i >= warmup:
                rates.append(r)
    return statistics.median(rates)


def _peak_bytes(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[int, int]:
    """(peak bytes, KV bytes) of ``generate(new_tokens)``; see :func:`compare_speed`."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    out = _generate_once(model, input_ids, new_tokens, return_cache=True)
    kv = kv_cache_bytes(output_cache(out))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base + model_bytes(model)
    else:
        peak = model_bytes(model) + kv
    return peak, kv


def compare_speed(
    models: Mapping[str, nn.Module],
    prefill_ids: torch.Tensor,
    decode_ids: torch.Tensor | None = None,
    *,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    baseline: str = "dense",
) -> dict[str, dict[str, float]]:
    """Time several models on the same inputs, interleaved, and report ratios to ``baseline``.

    Every repeat runs each model once (prefill of ``prefill_ids``, then the decode measurement of
    :func:`time_decode` on ``decode_ids``, default ``prefill_ids``), rotating the order each
    repeat so drift hits all models alike. Per model: ``prefill_s`` (median), ``decode_tok_s``
    (median), ``kv_bytes`` (cache after ``generate`` of ``new_tokens``), ``peak_bytes`` and
    ``param_bytes``; plus ``prefill_speedup = base_s / s`` and ``decode_speedup = tok_s / base_tok_s``
    (> 1 is faster), ``kv_ratio`` and ``peak_ratio``. ``peak_bytes``: on CUDA
    ``max_memory_allocated`` during that generate minus what was allocated before, plus the model's
    own parameter bytes; on CPU parameter + buffer bytes + KV bytes (process peak RSS cannot be
    reset between models, so it is not used).
    """
    if baseline not in models:
        raise ValueError(
            f"compare_speed needs a baseline entry {baseline!r}; got {', '.join(models) or 'none'}"
        )
    _check_counts(repeats, warmup, new_tokens)
    decode_ids = prefill_ids if decode_ids is None else decode_ids
    names = list(models)
    prefill: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    modes = {n: m.training for n, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            for i in range(warmup + repeats):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    model = models[name]
                    t = _prefill_once(model, _as_ids(prefill_ids, model))
                    r = _decode_rate(model, _as_ids(decode_ids, model), new_tokens)
                    if i >= warmup:
                        prefill[name].append(t)
                        decode[name].append(r)
            result: dict[str, dict[str, float]] = {}
            for name in names:
                model = models[name]
                peak, kv = _peak_bytes(model, _as_ids(decode_ids, model), new_tokens)
                result[name] = {
                    "prefill_s": statistics.median(prefill[name]),
                    "decode_tok_s": statistics.median(decode[name]),
                    "kv_bytes": float(kv),
                    "peak_bytes": float(peak),
                    "param_bytes": float(model_bytes(model)),
                }
    finally:
        for n, m in models.items():
            m.train(modes[n])
    base = result[baseline]
    for row in result.values():
        row["prefill_speedup"] = base["prefill_s"] / row["prefill_s"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["kv_ratio"] = row["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else float("nan")
        row["peak_ratio"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
    return result
