"""dynamic-k CPU decode speed vs dense on the embedded SmolLM2-135M, and where the time goes.

For each expert size: co-activation k-means, trained routers, per-layer thresholds at 50 % executed
expert compute (the SiLU model, no sparsification: speed depends on how many experts run and how they
are laid out, not on quality). Measured in one process, interleaved with dense, medians:

- runs of consecutive selected experts per token before/after ``order_experts_`` (calibration text);
- FFN decode: 32 single-token calls of layer 15's MLP (router + selection + experts) vs the dense MLP,
  and the same split into router+selection and expert compute;
- whole-model greedy decode tokens/s at batch 1 and 8 (``condify.evaluate.compare_speed``);
- the same with ``w_down`` put back in nn.Linear layout (row-major: an expert's down block is a column
  slice) instead of the column-major layout ``modify`` stores, to show what the layout buys.

    .venv/bin/python benchmarks/dynamic_k_speed.py       # writes results/dynamic_k_speed.{md,json}
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch

from condify.batches import as_batches
from condify.data import eval_batches, train_batches
from condify.methods.dynamic_k import executed_fraction, track_executed
from condify.methods.dynamic_k.calibrate import fit_tau, order_experts_
from condify.methods.dynamic_k.modules import converted, select
from condify.methods.dynamic_k.transform import _mlp_linears, block_layout_
from condify.ops import expert_mlp_decode

LAYER = 15
QUICK = dict(sizes=[128], calib_batches=1, router_steps=2, repeats=1)


def expert_parts(mlp: torch.nn.Module, xs: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(router + selection, expert compute) of a converted MLP as two calls over the tokens of ``xs``;
    the second uses the masks of the last run of the first. Reads condify internals."""
    info = harness.site_state(mlp)
    w = info.adapter.mlp_weights(mlp)
    tau, size, act = float(mlp.expert_layout.tau), info.expert_size, info.activation
    masks: list[list[bool]] = []

    def router() -> None:
        masks[:] = [select(mlp.router(xs[i : i + 1]), tau)[0].tolist() for i in range(xs.shape[0])]

    def experts() -> None:
        for i in range(xs.shape[0]):
            expert_mlp_decode(xs[i : i + 1], w["up"], w["down"], masks[i], size, act, w["gate"])

    return router, experts


def row_major_(model: torch.nn.Module) -> None:
    """Put every converted MLP's ``w_down`` back in nn.Linear layout. Reads condify internals."""
    for _, m in converted(model, "mlp"):
        block_layout_(_mlp_linears(m, harness.site_state(m).adapter), False, restore=True)


@torch.inference_mode()
def ffn_times(dense: torch.nn.Module, models: dict, xs: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Per model: median seconds of ``len(xs)`` single-token MLP calls, and of its two parts."""
    mlps = {
        "dense": dense.model.layers[LAYER].mlp,
        **{n: m.model.layers[LAYER].mlp for n, m in models.items()},
    }
    calls = {}
    for n, mlp in mlps.items():
        calls[(n, "mlp")] = harness.per_token(mlp, xs)
        if n != "dense":
            calls[(n, "router")], calls[(n, "experts")] = expert_parts(mlp, xs)
    t = harness.medians(harness.interleaved(calls, repeats, warmup=0, rotate=False))
    return {n: {part: v for (m, part), v in t.items() if m == n} for n in mlps}


def main() -> None:
    ap = harness.parser(
        __doc__, threads=1, out=harness.RESULTS / "dynamic_k_speed", out_help="results path stem", note=True
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--calib-batches", type=int, default=3)
    ap.add_argument("--router-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=7)
    args = harness.parse(ap, QUICK)
    t_start = time.time()
    dense, tok = harness.start(args)
    calib = as_batches(train_batches(tok, args.calib_batches, 2, 256))
    evals = as_batches(eval_batches(tok, "test", 2, 256, 4))
    cache = harness.mlp_cache(dense, calib, args.sizes[0])
    models, runs, executed = {}, {}, {}
    for s in args.sizes:
        model, data, _ = harness.routed(dense, s, cache, args.router_steps)
        fit_tau(model, data, 0.5)
        plain = copy.deepcopy(model)
        runs[s] = order_experts_(model, data)
        row_major = copy.deepcopy(model)
        row_major_(row_major)
        models[f"{s}"], models[f"{s} unordered"], models[f"{s} row-major"] = model, plain, row_major
        with torch.inference_mode(), track_executed(model) as st:
            model(evals[0]["input_ids"][:1])
        executed[s] = executed_fraction(st)
        print(s, runs[s], executed[s], flush=True)
    xs = harness.mlp_inputs(dense, evals[0]["input_ids"][:1, :64], LAYER)
    ffn = ffn_times(dense, models, xs, args.repeats)
    ordered = {"dense": dense, **{n: m for n, m in models.items() if "unordered" not in n}}
    spd = harness.decode_speedups(ordered, calib, evals, args.repeats // 2 + 1)
    res = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {str(k): v for k, v in runs.items()},
        "executed": {str(k): v for k, v in executed.items()},
        "ffn_s": ffn,
        "decode_b1": spd["b1"],
        "decode_b8": spd["b8"],
        "minutes": (time.time() - t_start) / 60,
        "environment": harness.environment(),
    }
    print(json.dumps(res), flush=True)
    harness.write_json(args.out.with_suffix(".json"), res)
    write(res, args.out.with_suffix(".md"))


def write(res: dict, path: Path) -> None:
    """Render ``res`` (as saved in ``dynamic_k_speed.json``) to the markdown file ``path``."""
    env, a = res["environment"], res["args"]
    d = res["ffn_s"]["dense"]["mlp"]
    n = 32
    rows = []
    for s in res["runs"]:
        f, fu, fr = res["ffn_s"][s], res["ffn_s"][f"{s} unordered"], res["ffn_s"][f"{s} row-major"]
        b1, b8 = res["decode_b1"], res["decode_b8"]
        r = res["runs"][s]
        rows.append([
            s, f"{res['executed'][s]:.2f}", f"{r['runs_per_token_before']:.1f} -> {r['runs_per_token_after']:.1f}",
            f"{d / fu['mlp']:.2f}", f"**{d / f['mlp']:.2f}**", f"{d / fr['mlp']:.2f}", f"{1e6 * f['router'] / n:.0f}",
            f"{1e6 * f['experts'] / n:.0f} ({1e6 * fr['experts'] / n:.0f})", f"{1e6 * d / n:.0f}",
            f"**{b1[s]:.2f}** ({b1[s + ' row-major']:.2f})", f"**{b8[s]:.2f}** ({b8[s + ' row-major']:.2f})",
        ])  # fmt: skip
    headers = [
        "experts", "executed (prompt)", "runs/token before -> after ordering", "FFN decode x (unordered)",
        "FFN x (ordered)", "FFN x (ordered, row-major w_down)", "router+select us/token",
        "experts us/token (row-major)", "dense MLP us/token", "model decode x b=1 (row-major)", "b=8 (row-major)",
    ]  # fmt: skip
    head = [
        "# dynamic-k CPU decode speed on SmolLM2-135M",
        "",
        f"Machine: {env.get('cpu', '?')}, {a['threads']} torch thread(s), torch {env.get('torch', '?')}, "
        f"{res['minutes']:.1f} min; {a.get('note', 'nothing else running')}. Command: `.venv/bin/python benchmarks/dynamic_k_speed.py`.",
        "Thresholds at 50 % executed expert compute on calibration text (SiLU model, trained routers).",
        "",
    ]
    harness.write_markdown(path, [*head, harness.table(headers, rows)])


if __name__ == "__main__":
    main()
