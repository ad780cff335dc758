"""``condify frontier``: every method's budget knob swept with its defaults, beside a training-free baseline.

For each point the model is converted with ``condify.modify(model, method)`` and calibrated with
``condify.calibrate(model, data, <knob>=<value>)`` and nothing else (the defaults are the product),
then judged against the dense model on held-out text it was not calibrated on: perplexity ratio,
executed FLOPs (``condify.evaluate.executed_flops``, 1 x ``seq_len`` tokens) and the decode / prefill
speed-up (``condify.evaluate.compare_speed``, batch 1, interleaved with dense, medians).

The baseline (:func:`magnitude_topk`) is TEAL-style activation sparsity without training: per token,
only the largest-magnitude ``fraction`` of the entries of each MLP projection's input are kept (the
hidden state for gate/up, the intermediate activation for down), so ``fraction`` of the MLP's
multiply-adds are needed. It is applied with masks through hooks, so its executed FLOPs are computed
(``total - (1 - fraction) * mlp``), not counted, and it has no speed entry.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import evaluate, registry
from .adapters import get_adapter
from .patching import patched


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One method's budget knob: the option a user sets and the values swept (gentle first)."""

    method: str
    knob: str
    values: tuple[float | int, ...]
    at: str = "calibrate"  # where the knob goes: "calibrate" or "modify"
    calibrate: dict[str, Any] = dataclasses.field(default_factory=dict)  # fixed options (not budget)

    def calls(self, value: float | int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(modify options, calibrate options) for ``value``."""
        knob = {self.knob: value}
        return (knob, dict(self.calibrate)) if self.at == "modify" else ({}, {**self.calibrate, **knob})


# The budgets of benchmarks/results/defaults.md: dynamic-k / lte at 75 % and 50 % of the MLP executed,
# mod-threshold at capacity 0.75 and 0.5, layer-parallel at 2 and 4 pairs, mot after the transition to
# top-12 and top-8 of its 16 experts (on the second half of the layers, its default).
SWEEPS: dict[str, Sweep] = {
    "dynamic-k": Sweep("dynamic-k", "target_sparsity", (0.25, 0.5)),
    "lte": Sweep("lte", "target_sparsity", (0.25, 0.5)),
    "mod-threshold": Sweep("mod-threshold", "capacity", (0.75, 0.5)),
    "layer-parallel": Sweep("layer-parallel", "pairs", (2, 4)),
    "mot": Sweep("mot", "top_k", (12, 8), at="modify", calibrate={"stage": "full"}),
}
BASELINE_FRACTIONS = (0.75, 0.5)


@contextlib.contextmanager
def magnitude_topk(model: nn.Module, fraction: float) -> Iterator[None]:
    """Keep, per token, the ``fraction`` largest-magnitude inputs of every MLP projection (TEAL-style)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    a = get_adapter(model)

    def sparsify(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        k = max(1, round(fraction * x.shape[-1]))
        if k == x.shape[-1]:
            return args
        idx = x.abs().topk(k, dim=-1).indices
        return (torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx)), *args[1:])

    handles = []
    for layer in a.layer_list(model):
        mlp = layer.get_submodule(a.mlp)
        for name in (a.gate, a.up, a.gate_up, a.down):
            if name is not None:
                handles.append(mlp.get_submodule(name).register_forward_pre_hook(sparsify))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _groups(flops: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    return {
        "executed_flops": flops["total"] / dense["total"],
        "executed_mlp": flops["mlp"] / dense["mlp"] if dense["mlp"] else math.nan,
    }


@dataclasses.dataclass
class Context:
    """What every point is judged on: the dense model, calibration batches, held-out batches."""

    dense: nn.Module
    train: list[torch.Tensor]
    held: list[torch.Tensor]
    dense_ppl: float
    dense_flops: dict[str, float]
    speed: bool = True
    repeats: int = 3

    def judge(self, model: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"ppl": evaluate.perplexity(model, self.held, progress=False)}
        out["ratio"] = out["ppl"] / self.dense_ppl
        out.update(_groups(evaluate.executed_flops(model, self.held[0][:1]), self.dense_flops))
        if self.speed:
            ids = self.held[0][:1, :64]
            s = evaluate.compare_speed(
                {"dense": self.dense, "condify": model}, self.held[0][:1], ids, new_tokens=16,
                repeats=self.repeats,
            )["condify"]  # fmt: skip
            out["decode_speedup"], out["prefill_speedup"] = s["decode_speedup"], s["prefill_speedup"]
        return out


def method_point(ctx: Context, sweep: Sweep, value: float | int, progress: bool = False) -> dict[str, Any]:
    """Convert a copy of the dense model with ``sweep``'s method at ``value`` and defaults; judge it.

    The point keeps calibrate's own result (``calibrate_result``: its scalars, lists and per-pass records)."""
    import condify

    mod_opts, cal_opts = sweep.calls(value)
    model = copy.deepcopy(ctx.dense)
    t0 = time.perf_counter()
    condify.modify(model, sweep.method, **mod_opts)
    cal = condify.calibrate(model, ctx.train, progress=progress, **cal_opts)
    seconds = time.perf_counter() - t0
    point = {
        "method": sweep.method, "knob": sweep.knob, "value": value, "modify": mod_opts, "calibrate": cal_opts,
        "tokens": cal["tokens"], "minutes": seconds / 60, "calibrate_ratio": cal["ratio"],
        "calibrate_ratio_high": cal["ratio_high"], "executed": cal["executed"],
        "calibrate_result": {k: v for k, v in cal.items() if not isinstance(v, dict) or k.endswith("passes")},
    }  # fmt: skip
    point.update(ctx.judge(model))
    return point


def baseline_point(ctx: Context, fraction: float) -> dict[str, Any]:
    """The training-free magnitude top-k baseline at ``fraction`` of the MLP executed."""
    with magnitude_topk(ctx.dense, fraction):
        ppl = evaluate.perplexity(ctx.dense, ctx.held, progress=False)
    mlp = ctx.dense_flops["mlp"]
    total = ctx.dense_flops["total"] - (1 - fraction) * mlp
    return {
        "method": "magnitude top-k (baseline)", "knob": "fraction", "value": fraction, "tokens": 0,
        "minutes": 0.0, "executed": fraction, "ppl": ppl, "ratio": ppl / ctx.dense_ppl,
        "executed_flops": total / ctx.dense_flops["total"], "executed_mlp": fraction,
    }  # fmt: skip


def composed_point(
    ctx: Context, steps: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]
) -> dict[str, Any]:
    """Methods applied in turn, each ``modify`` then ``calibrate(method=...)`` with its defaults."""
    import condify

    model = copy.deepcopy(ctx.dense)
    t0, tokens = time.perf_counter(), 0
    for method, mod_opts, cal_opts in steps:
        if mod_opts.get("layers") == FREE:  # the layers no earlier method owns
            owned = {m._condify_patch.state.layer for _, m in patched(model)}
            n = len(get_adapter(model).layer_list(model))
            mod_opts = {**mod_opts, "layers": [i for i in range(n) if i not in owned]}
        condify.modify(model, method, **mod_opts)
        tokens += condify.calibrate(model, ctx.train, method=method, progress=False, **cal_opts)["tokens"]
    label = " + ".join(
        f"{m}({', '.join(f'{k}={v}' for k, v in {**mo, **co}.items())})" for m, mo, co in steps
    )
    point = {"method": "composed", "knob": label, "value": None, "tokens": tokens,
             "minutes": (time.perf_counter() - t0) / 60, "executed": None}  # fmt: skip
    point.update(ctx.judge(model))
    return point


FREE = "free"
# layer-parallel's two pairs, then dynamic-k at 75 % on every other layer (methods own disjoint layers)
COMPOSED = (("layer-parallel", {}, {"pairs": 2}), ("dynamic-k", {"layers": FREE}, {"target_sparsity": 0.25}))


def sweep(
    dense: nn.Module,
    train: list[torch.Tensor],
    held: list[torch.Tensor],
    *,
    methods: Sequence[str] | None = None,
    values: dict[str, Sequence[float | int]] | None = None,
    composed: bool = True,
    speed: bool = True,
    repeats: int = 3,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every method's points, the baseline at the same MLP fractions and the composed configuration."""
    names = list(methods or SWEEPS)
    unknown = [m for m in names if m not in SWEEPS]
    if unknown:
        raise ValueError(f"no frontier sweep for {unknown}; known: {sorted(SWEEPS)}")
    for m in names:
        registry.get(m)
    dense.eval()
    ctx = Context(dense, train, held, evaluate.perplexity(dense, held, progress=False),
                  evaluate.executed_flops(dense, held[0][:1]), speed, repeats)  # fmt: skip
    points: list[dict[str, Any]] = []

    def add(p: dict[str, Any]) -> None:
        points.append(p)
        if log is not None:
            log(p)

    for m in names:
        sw = SWEEPS[m]
        for v in (values or {}).get(m, sw.values):
            add(method_point(ctx, sw, v))
    for f in BASELINE_FRACTIONS:
        add(baseline_point(ctx, f))
    if composed:
        add(composed_point(ctx, COMPOSED))
    return {"dense_ppl": ctx.dense_ppl, "dense_flops": ctx.dense_flops, "points": points,
            "train": [len(train), *train[0].shape], "held": [len(held), *held[0].shape]}  # fmt: skip


# --------------------------------------------------------------------------- one run

QUICK = {"batches": 6, "seq_len": 128, "eval_sequences": 4, "repeats": 1}  # a smoke run: minutes


def run(
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    text: str = "shakespeare",
    methods: Sequence[str] | None = None,
    values: dict[str, Sequence[float | int]] | None = None,
    batches: int = 32,
    seq_len: int = 512,
    eval_sequences: int = 16,
    repeats: int = 3,
    speed: bool = True,
    composed: bool = True,
    seed: int = 0,
    command: str = "condify frontier",
    log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load the model, sweep on ``batches`` random windows of the text's train split, judge on
    ``eval_sequences`` windows of its test split; write ``frontier-<model>-<text>.{json,md,png}``."""
    import json
    import os

    from . import data
    from .environment import environment

    if text not in data.TEXTS:
        raise ValueError(f"unknown text {text!r}; condify.data provides: {', '.join(data.TEXTS)}")
    torch.manual_seed(seed)
    model, tok = data.load_model(model_name)
    known = {
        None: "SmolLM2-135M-Instruct",
        data.DEFAULT_MODEL: "SmolLM2-135M-Instruct",
        data.GEMMA3_MODEL: "Gemma-3-270M",
    }
    name = known.get(model_name and model_name.lower(), model_name)
    bos = data.adds_bos(tok)  # the windows the model was trained on (Gemma: BOS first)
    train = data.train_batches(tok, batches, 1, seq_len, seed=seed, text=text, bos=bos)  # random windows
    held = data.eval_batches(tok, "test", eval_sequences, seq_len, batch_size=1, text=text, bos=bos)
    env = environment()
    env["load_average"] = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "nan"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"frontier-{Path(name).name.split('-')[0].lower()}-{text}"
    partial = out / f"{stem}.partial.json"  # every point as it lands: a long run that stops keeps them
    done: list[dict[str, Any]] = []

    def keep(point: dict[str, Any]) -> None:
        done.append(point)
        partial.write_text(json.dumps({"model": name, "text": text, "command": command, "points": done}, indent=1,
                                      default=str))  # fmt: skip
        if log is not None:
            log(point)

    res = sweep(
        model,
        train,
        held,
        methods=methods,
        values=values,
        composed=composed,
        speed=speed,
        repeats=repeats,
        log=keep,
    )
    res.update({"model": name, "text": text, "environment": env, "command": command, "bos": bos,
                "batches": batches, "seq_len": seq_len, "eval_sequences": eval_sequences})  # fmt: skip
    res["files"] = report(res, out, stem)
    partial.unlink(missing_ok=True)
    return res


# --------------------------------------------------------------------------- report


def report(res: dict[str, Any], out: Path, stem: str) -> list[str]:
    """Write ``<stem>.json``, ``.md`` and ``.png`` for a run's result ``res``; returns the paths."""
    import json

    name, text, env = res["model"], res["text"], res["environment"]
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    plot(res["points"], out / f"{stem}.png", f"{name} on {text}: defaults at each budget vs magnitude top-k")
    lines = [
        f"# Frontier: {name} on {text}",
        "",
        f"`{res['command']}`: calibration on {res['batches']} windows of {res['seq_len']} tokens of the train "
        f"split (calibrate holds out the last 10 %){', BOS first in every window' if res['bos'] else ''}, "
        f"judged on {res['eval_sequences']} windows of the test split (never calibrated on). Dense held-out "
        f"perplexity {res['dense_ppl']:.3f}. Each point: `condify.modify(model, method)` + "
        "`condify.calibrate(model, batches, <budget>)` with the defaults; the baseline is training-free.",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {env['torch_threads']} "
        f"threads, load average {env['load_average']} at the start; {env['date']}.",
        "",
        *table(res["points"]),
        "",
        f"![frontier]({stem}.png)",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return [str(out / f"{stem}.{x}") for x in ("md", "json", "png")]


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def table(points: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown rows: one per point."""
    rows = [
        "| method | budget | held-out ppl ratio | executed (method) | executed FLOPs (total) | decode speed-up "
        "| prefill speed-up | calibration tokens | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        budget = p["knob"] if p["value"] is None else f"{p['knob']}={p['value']}"
        rows.append(
            f"| {p['method']} | {budget} | x{p['ratio']:.3f} | {_cell(p.get('executed'), '.1%')} "
            f"| {_cell(p.get('executed_flops'), '.1%')} | {_cell(p.get('decode_speedup'), '.2f')} "
            f"| {_cell(p.get('prefill_speedup'), '.2f')} | {p['tokens']} | {p['minutes']:.1f} |"
        )
    return rows


def plot(points: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Ratio vs executed FLOPs and, when any point has one, vs decode speed-up; one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "executed_flops": "executed FLOPs / dense (1 x seq_len tokens; lower is cheaper)",
        "decode_speedup": "decode speed-up vs dense, batch 1 (higher is faster)",
    }
    keys = [k for k in labels if any(p.get(k) is not None for p in points)] or ["executed_flops"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 + 3.75 * len(keys), 4.2), squeeze=False)
    axes = list(axes[0])
    by: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by.setdefault(p["method"], []).append(p)
    for i, (name, ps) in enumerate(by.items()):
        fmt, color = ("--o", "k") if "baseline" in name else ("-o", f"C{i}")  # one colour per method
        for ax, x in zip(axes, keys, strict=True):
            xs = [(p[x], p["ratio"]) for p in ps if p.get(x) is not None]
            if xs:
                xs.sort()
                ax.plot([a for a, _ in xs], [b for _, b in xs], fmt, color=color, label=name)
    for ax, x in zip(axes, keys, strict=True):
        ax.set_xlabel(labels[x])
        ax.set_ylabel("held-out perplexity / dense (lower is better)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
