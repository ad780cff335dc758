"""The main job: convert, calibrate, evaluate against dense, report. Used by ``condify run``."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

from torch import nn

from . import registry
from .convert import applied_configs, describe, modify, unmodify


def dense_twin(model: nn.Module) -> nn.Module:
    """A dense copy of a converted model (``unmodify`` on a deep copy): the baseline it is judged by."""
    dense = copy.deepcopy(model)
    if applied_configs(dense):
        unmodify(dense)
    return dense


def evaluate_pair(
    model: nn.Module,
    dense: nn.Module,
    tokenizer: Any,
    *,
    eval_sequences: int = 16,
    seq_len: int = 512,
    speed: bool = True,
    speed_repeats: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out perplexity, executed FLOPs and speed of ``model`` vs ``dense``, in this process."""
    from . import data, evaluate

    batches = data.eval_batches(
        tokenizer, "test", num_sequences=eval_sequences, seq_len=seq_len, batch_size=4
    )
    out: dict[str, Any] = {"eval_tokens": eval_sequences * seq_len}
    out["dense_ppl"] = evaluate.perplexity(dense, batches, progress=progress)
    out["ppl"] = evaluate.perplexity(model, batches, progress=progress)
    out["ratio"] = out["ppl"] / out["dense_ppl"]
    probe = batches[0][:1]
    out["flops"] = evaluate.executed_flops(model, probe)
    out["flops_dense"] = evaluate.executed_flops(dense, probe)
    if speed:
        prompt = batches[0][:1, :64]
        rows = {}
        for bs in (1, 8):
            ids = batches[0][:1, :64].repeat(bs, 1) if bs > 1 else prompt
            rows[f"batch{bs}"] = evaluate.compare_speed(
                {"dense": dense, "condify": model}, batches[0][:1], ids, new_tokens=16, repeats=speed_repeats
            )
        out["speed"] = rows
    return out


def run(
    method: str,
    *,
    model_name: str | None = None,
    budget: str = "cpu",
    out_dir: str | Path = "out",
    modify_options: dict[str, Any] | None = None,
    calibrate_options: dict[str, Any] | None = None,
    eval_sequences: int = 16,
    speed: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a model (default: embedded SmolLM2), apply ``method`` with the ``budget`` recipe,
    calibrate on the training plays, evaluate vs dense on held-out plays, write ``out_dir/report.md``."""
    from . import data, evaluate
    from .report import Report

    spec = registry.get(method)
    if budget not in spec.recipes:
        raise ValueError(f"{method!r} has no {budget!r} budget; available: {sorted(spec.recipes)}")
    if threads:
        evaluate.set_threads(threads)
    recipe = spec.recipes[budget]
    mod_opts = {**recipe.modify, **(modify_options or {})}
    cal_opts = {**recipe.calibrate, **(calibrate_options or {})}

    t0 = time.perf_counter()
    model, tokenizer = data.load_model(model_name)
    dense = copy.deepcopy(model)
    modify(model, method, **mod_opts)
    train = data.train_batches(
        tokenizer, recipe.data.num_batches, recipe.data.batch_size, recipe.data.seq_len
    )
    t1 = time.perf_counter()
    from . import calibrate

    cal = calibrate(model, train, progress=progress, **cal_opts)
    t2 = time.perf_counter()
    ev = evaluate_pair(model, dense, tokenizer, eval_sequences=eval_sequences, speed=speed, progress=progress)
    t3 = time.perf_counter()

    rep = Report(
        f"condify {method} on {model_name or 'SmolLM2-135M-Instruct (embedded)'}", evaluate.environment()
    )
    rep.add_text(
        f"Budget `{budget}`, as a user would write it, on {len(train)} batches of {tuple(train[0].shape)} "
        f"training tokens (calibrate holds out the last 10 %):\n\n```python\n"
        f"{call('condify.modify', ['model', repr(method)], mod_opts)}\n"
        f"{call('condify.calibrate', ['model', 'batches'], cal_opts)}\n```\n\n"
        f"Calibration took {t2 - t1:.0f} s, evaluation {t3 - t2:.0f} s."
    )
    rep.add_heading("Quality and compute")
    f, fd = ev["flops"], ev["flops_dense"]
    rows = [
        [
            "perplexity (held-out plays)",
            f"{ev['dense_ppl']:.3f}",
            f"{ev['ppl']:.3f}",
            f"x{ev['ratio']:.3f}",
        ]
    ]
    for k in ("attention", "mlp", "lm_head", "other", "total"):
        if fd.get(k) or f.get(k):  # "other": work outside attention/MLP modules, e.g. fused pairs
            ratio = f"x{f.get(k, 0) / fd[k]:.3f}" if fd.get(k) else "-"
            rows.append(
                [
                    f"executed GFLOPs: {k} (1x512 tokens)",
                    f"{fd.get(k, 0) / 1e9:.2f}",
                    f"{f.get(k, 0) / 1e9:.2f}",
                    ratio,
                ]
            )
    rep.add_table(["metric", "dense", "condify", "ratio"], rows)
    if "speed" in ev:
        rep.add_heading("Speed vs dense (same process, interleaved, medians)")
        srows = []
        for name, r in ev["speed"].items():
            c = r["condify"]
            srows.append(
                [name, f"{c['prefill_speedup']:.2f}x", f"{c['decode_speedup']:.2f}x", f"{c['kv_ratio']:.2f}x"]
            )
        rep.add_table(["decode batch", "prefill 512 speed-up", "decode speed-up", "KV bytes ratio"], srows)
        rep.plot_bars(
            "quality",
            ["perplexity", "executed FLOPs"],
            [ev["ratio"], f["total"] / fd["total"]],
            ylabel="ratio to dense (lower is better)",
            title="quality and compute vs dense",
            reference=1.0,
        )
        rep.plot_bars(
            "speed",
            [f"{kind} {k}" for k in ev["speed"] for kind in ("prefill", "decode")],
            [r["condify"][f"{kind}_speedup"] for r in ev["speed"].values() for kind in ("prefill", "decode")],
            ylabel="speed-up vs dense (higher is better)",
            title="speed vs dense",
            reference=1.0,
        )
    rep.add_heading("Calibration")
    rep.add_text("```\n" + "\n".join(f"{k}: {_short(v)}" for k, v in (cal or {}).items()) + "\n```")
    rep.add_heading("What was converted")
    rep.add_text("```\n" + describe(model) + "\n```")
    path = rep.write(out_dir)
    return {
        "report": str(path),
        "calibration": cal,
        "evaluation": ev,
        "seconds": {"load+modify": t1 - t0, "calibrate": t2 - t1, "evaluate": t3 - t2},
    }


def _literal(v: Any) -> str:
    """``v`` as Python source, with arithmetic progressions as ``range(...)``."""
    if isinstance(v, list) and len(v) > 3 and all(isinstance(x, int) for x in v):
        step = v[1] - v[0]
        if step > 0 and all(b - a == step for a, b in zip(v, v[1:], strict=False)):
            return f"range({v[0]}, {v[-1] + 1}{f', {step}' if step != 1 else ''})"
    return repr(v)


def call(fn: str, args: list[str], options: dict[str, Any]) -> str:
    """The call a user would write, e.g. ``condify.calibrate(model, batches, pairs=2)``."""
    return f"{fn}({', '.join([*args, *(f'{k}={_literal(v)}' for k, v in options.items())])})"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"[{', '.join(_short(x) for x in v[:4])}, ... ({len(v)} items)]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def print_summary(result: dict[str, Any]) -> None:
    ev = result["evaluation"]
    print(f"held-out perplexity: dense {ev['dense_ppl']:.3f}, condify {ev['ppl']:.3f} (x{ev['ratio']:.3f})")
    f, fd = ev["flops"], ev["flops_dense"]
    # every group: work a method moves out of a block (fused pairs run the MLP outside `mlp`) shows up
    groups = [
        f"{k} x{f.get(k, 0) / fd[k]:.3f}" for k in ("attention", "mlp", "lm_head", "other") if fd.get(k)
    ]
    if f.get("other") and not fd.get("other"):
        groups.append(f"other +{f['other'] / 1e9:.2f} GFLOPs")
    print(f"executed FLOPs vs dense: x{f['total'] / fd['total']:.3f} ({', '.join(groups)})")
    for name, r in ev.get("speed", {}).items():
        c = r["condify"]
        print(
            f"{name}: decode x{c['decode_speedup']:.2f}, prefill x{c['prefill_speedup']:.2f}, KV bytes x{c['kv_ratio']:.2f}"
        )
    print(f"report: {result['report']}")
