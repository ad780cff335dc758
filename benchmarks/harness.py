"""Shared benchmark harness: arguments, environment, interleaved timing, markdown and JSON writers.

Each script in ``benchmarks/`` is a plug-in: ``parser()`` plus its own options, ``parse()``,
``start()`` (or ``setup()``), its measurements, then ``write_json`` / ``table`` / ``write_markdown``.
``--quick`` runs a script's smallest settings and writes under ``QUICK_DIR`` unless ``--out`` is given.
The dynamic-k helpers at the end are shared by ``dynamic_k.py`` and ``dynamic_k_speed.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

import condify
from condify import data, evaluate
from condify.environment import environment as condify_environment
from condify.environment import set_threads
from condify.evaluate import compare_speed
from condify.methods.dynamic_k.calibrate import collect, train_routers
from condify.methods.dynamic_k.clustering import balanced_kmeans, permutation
from condify.methods.dynamic_k.modules import converted, expert_norms
from condify.methods.dynamic_k.transform import relayout_
from condify.report import format_value

RESULTS = Path(__file__).parent / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "condify-bench-quick"  # where --quick writes unless --out is given

Timer = Callable[[Callable[[], object]], float]
K = TypeVar("K", bound=Hashable)

# --------------------------------------------------------------------------- arguments


def parser(
    doc: str | None,
    *,
    threads: int,
    out: Path | None,
    out_help: str,
    render: str | None = None,
    model: bool = True,
    note: bool = False,
) -> argparse.ArgumentParser:
    """Parser with the common options: ``--threads --seed --out --quick``, ``--model`` (with ``model``),
    ``--note`` (with ``note``) and ``--render [JSON]`` (when ``render``, its help text, is given)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        p.add_argument("--model", default=None, help="model for condify.data.load_model (default: SmolLM2)")
    p.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="torch seed")
    p.add_argument("--out", type=Path, default=out, help=out_help)
    p.add_argument("--quick", action="store_true", help=f"smallest settings, a smoke run (into {QUICK_DIR})")
    if note:
        p.add_argument("--note", default="nothing else running", help="machine state, for the report")
    if render is not None:
        p.add_argument("--render", nargs="?", const="", default=None, metavar="JSON", help=render)
    return p


def parse(
    p: argparse.ArgumentParser, quick: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the ``quick`` values (and an ``--out`` under ``QUICK_DIR``) become
    the defaults, so options given explicitly still win."""
    args = p.parse_args(argv)
    if args.quick:
        default = p.get_default("out")
        if isinstance(default, Path) and default.is_relative_to(RESULTS):
            p.set_defaults(out=QUICK_DIR / default.relative_to(RESULTS))
        p.set_defaults(**quick)
        args = p.parse_args(argv)
        QUICK_DIR.mkdir(parents=True, exist_ok=True)
    return args


def setup(args: argparse.Namespace) -> None:
    """Set the torch thread count and seed from ``args``."""
    set_threads(args.threads)
    torch.manual_seed(args.seed)


def start(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """:func:`setup`, then ``condify.data.load_model(args.model)``: (model, tokenizer)."""
    setup(args)
    return data.load_model(args.model)


def frontier_windows(
    model: str, text: str, batches: int, seq_len: int, evals: int
) -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor], float]:
    """The windows ``frontier.py`` uses (seed 0): (model, calibration windows, test windows, dense
    perplexity on the test windows). ``model``: ``"smol"`` (the embedded model) or a ``load_model`` name."""
    m, tok = data.load_model(None if model == "smol" else model)
    bos = data.adds_bos(tok)
    train = data.train_batches(tok, batches, 1, seq_len, seed=0, text=text, bos=bos)
    test = data.eval_batches(tok, "test", evals, seq_len, batch_size=1, text=text, bos=bos)
    return m, train, test, evaluate.perplexity(m, test, progress=False)


# --------------------------------------------------------------------------- environment


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """``condify.environment.environment()`` plus the 1-minute load average."""
    env = condify_environment(device)
    env["load_average"] = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "nan"
    return env


# --------------------------------------------------------------------------- timing


def wall(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    calls: Mapping[K, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    *,
    rotate: bool = True,
    timer: Timer = wall,
) -> dict[K, list[float]]:
    """Seconds per repeat of each call: every round runs all ``calls`` once, in turn (the order shifted
    by one each round when ``rotate``); the first ``warmup`` rounds are not kept."""
    names = list(calls)
    times: dict[K, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        s = r % len(names) if rotate else 0
        for n in names[s:] + names[:s]:
            t = timer(calls[n])
            if r >= warmup:
                times[n].append(t)
    return times


def medians(times: Mapping[K, Sequence[float]]) -> dict[K, float]:
    """Median of each non-empty series."""
    return {n: statistics.median(v) for n, v in times.items() if v}


def per_token(fn: Callable[[torch.Tensor], object], xs: torch.Tensor) -> Callable[[], None]:
    """A call that runs ``fn`` on each row of ``xs`` in turn, as a batch of one (decode-like)."""

    def run() -> None:
        for i in range(xs.shape[0]):
            fn(xs[i : i + 1])

    return run


# --------------------------------------------------------------------------- writers


def row(cells: Sequence[Any]) -> str:
    """One markdown table row (cells through ``condify.report.format_value``)."""
    return "| " + " | ".join(format_value(c) for c in cells) + " |"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> str:
    """Markdown table of :func:`row` lines, an italic caption above."""
    lines = [row(headers), "|" + "|".join("---" for _ in headers) + "|", *(row(r) for r in rows)]
    return "\n".join([f"*{caption}*", "", *lines] if caption else lines)


def write_markdown(path: Path, lines: Sequence[str], *, append: bool = False) -> Path:
    """Write ``lines`` joined by newlines (appended after a blank line with ``append``); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.write(("\n" if append else "") + "\n".join(lines) + "\n")
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON, indent 1, other objects (paths) as strings; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
    return path


def read_json(path: Path) -> Any:
    """The JSON value stored at ``path``."""
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- dynamic-k (shared)


def site_state(module: torch.nn.Module) -> Any:
    """The typed condify state of a converted module (the one place the benchmarks read it)."""
    return condify.patching.state(module)


def dynamic_k_copy(base: torch.nn.Module, size: int, **opts: Any) -> torch.nn.Module:
    """Copy of ``base`` converted by dynamic-k with ``size``-neuron co-activation experts."""
    return condify.modify(
        copy.deepcopy(base), "dynamic-k", expert_size=size, clustering="coactivation", **opts
    )


@torch.no_grad()
def mlp_cache(
    base: torch.nn.Module, calib: list, size: int, **opts: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the calibration data: every MLP's input x and hidden h (original neuron order).

    Shared by all expert sizes (k-means on |h| profiles and the router targets are computed from it),
    so each (model, size) costs no extra forward passes.
    """
    model = dynamic_k_copy(base, size, **opts)
    xs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in converted(model)}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, p=p: xs[p].append(a[0].reshape(-1, a[0].shape[-1])))
        for p, m in converted(model)
    ]
    hs = collect(model, calib, 1 << 30, "hidden")
    for h in hooks:
        h.remove()
    return {p: (torch.cat(xs[p]), torch.cat(hs[p])) for p in xs}


def routed(
    base: torch.nn.Module, size: int, cache: dict, router_steps: int, **opts: Any
) -> tuple[torch.nn.Module, dict, dict]:
    """Copy of ``base`` converted with ``size``-neuron experts: co-activation k-means, trained routers.

    Returns (model, router data per MLP path, router fit statistics)."""
    model = dynamic_k_copy(base, size, **opts)
    data = {}
    with torch.no_grad():
        for p, m in converted(model):
            info = site_state(m)
            x, h = cache[p]
            perm = permutation(balanced_kmeans(h.abs().t(), info.experts, seed=info.layer))
            relayout_(m, info.adapter, perm)
            data[p] = (x, expert_norms(h[:, perm], info.adapter.mlp_weights(m)["down"], size))
    fit = train_routers(model, data, router_steps, batch_size=128, progress=False)
    return model, data, fit


@torch.inference_mode()
def mlp_inputs(model: torch.nn.Module, ids: torch.Tensor, layer: int, n: int = 32) -> torch.Tensor:
    """The inputs of the first ``n`` tokens (batch row 0) to layer ``layer``'s MLP on a forward of ``ids``."""
    xs: list[torch.Tensor] = []
    hook = model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda m, a: xs.append(a[0][0, :n].clone())
    )
    model(ids)
    hook.remove()
    return xs[0]


def decode_speedups(
    models: Mapping[str, torch.nn.Module], calib: list, evals: list, repeats: int
) -> dict[str, dict[str, float]]:
    """Whole-model decode speedup vs ``models["dense"]`` (``compare_speed``, 32-token prompts, 16 new
    tokens) at batch 1 (``"b1"``) and batch 8 (``"b8"``)."""
    prompts = {
        "b1": calib[0]["input_ids"][:1, :32],
        "b8": torch.cat([b["input_ids"] for b in calib + evals])[:8, :32],
    }
    return {
        b: {
            k: v["decode_speedup"]
            for k, v in compare_speed(models, ids, new_tokens=16, repeats=repeats).items()
        }
        for b, ids in prompts.items()
    }
