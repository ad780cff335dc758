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

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from dynamic_k import mlp_cache, routed

from condify.data import eval_batches, load_model, train_batches
from condify.evaluate import compare_speed, environment, set_threads
from condify.methods.dynamic_k import track_executed
from condify.methods.dynamic_k.calibrate import fit_tau, order_experts_
from condify.methods.dynamic_k.modules import converted, select
from condify.methods.dynamic_k.transform import _mlp_linears, block_layout_
from condify.ops import expert_mlp_decode
from condify.training import as_batches

RESULTS = Path(__file__).parent / "results"
LAYER = 15


@torch.inference_mode()
def ffn_times(dense: torch.nn.Module, models: dict, xs: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Per model: median seconds of ``len(xs)`` single-token MLP calls, and of its two parts."""
    mlps = {
        "dense": dense.model.layers[LAYER].mlp,
        **{n: m.model.layers[LAYER].mlp for n, m in models.items()},
    }
    t: dict[str, dict[str, list[float]]] = {n: {"mlp": [], "router": [], "experts": []} for n in mlps}
    for _ in range(repeats):
        for n, mlp in mlps.items():
            t0 = time.perf_counter()
            for i in range(xs.shape[0]):
                mlp(xs[i : i + 1])
            t[n]["mlp"].append(time.perf_counter() - t0)
            if n == "dense":
                continue
            info = mlp._condify_patch.info
            w = info["adapter"].mlp_weights(mlp)
            tau = float(mlp.expert_layout.tau)
            t0 = time.perf_counter()
            masks = [select(mlp.router(xs[i : i + 1]), tau)[0].tolist() for i in range(xs.shape[0])]
            t[n]["router"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(xs.shape[0]):
                expert_mlp_decode(
                    xs[i : i + 1],
                    w["up"],
                    w["down"],
                    masks[i],
                    info["expert_size"],
                    info["activation"],
                    w["gate"],
                )
            t[n]["experts"].append(time.perf_counter() - t0)
    return {n: {k: statistics.median(v) for k, v in parts.items() if v} for n, parts in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--calib-batches", type=int, default=3)
    ap.add_argument("--router-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "dynamic_k_speed")
    ap.add_argument("--note", default="nothing else running", help="machine state, for the report")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    dense, tok = load_model()
    calib = as_batches(train_batches(tok, args.calib_batches, 2, 256))
    evals = as_batches(eval_batches(tok, "test", 2, 256, 4))
    cache = mlp_cache(dense, calib, args.sizes[0])
    models, runs, executed = {}, {}, {}
    for s in args.sizes:
        model, data, _ = routed(dense, s, cache, args)
        fit_tau(model, data, 0.5)
        plain = copy.deepcopy(model)
        runs[s] = order_experts_(model, data)
        row_major = copy.deepcopy(model)
        for _, m in converted(row_major, "mlp"):
            block_layout_(_mlp_linears(m, m._condify_patch.info["adapter"]), False, restore=True)
        models[f"{s}"], models[f"{s} unordered"], models[f"{s} row-major"] = model, plain, row_major
        with torch.inference_mode(), track_executed(model) as st:
            model(evals[0]["input_ids"][:1])
        executed[s] = sum(v[0] for v in st.values()) / sum(v[1] for v in st.values())
        print(s, runs[s], executed[s], flush=True)
    xs = []
    hook = dense.model.layers[LAYER].mlp.register_forward_pre_hook(
        lambda m, a: xs.append(a[0][0, :32].clone())
    )
    with torch.inference_mode():
        dense(evals[0]["input_ids"][:1, :64])
    hook.remove()
    ffn = ffn_times(dense, models, xs[0], args.repeats)
    ordered = {"dense": dense, **{n: m for n, m in models.items() if "unordered" not in n}}
    prompt1 = calib[0]["input_ids"][:1, :32]
    prompt8 = torch.cat([b["input_ids"] for b in calib + evals])[:8, :32]
    spd1 = compare_speed(ordered, prompt1, new_tokens=16, repeats=args.repeats // 2 + 1)
    spd8 = compare_speed(ordered, prompt8, new_tokens=16, repeats=args.repeats // 2 + 1)
    res = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {str(k): v for k, v in runs.items()},
        "executed": {str(k): v for k, v in executed.items()},
        "ffn_s": ffn,
        "decode_b1": {k: v["decode_speedup"] for k, v in spd1.items()},
        "decode_b8": {k: v["decode_speedup"] for k, v in spd8.items()},
        "minutes": (time.time() - t_start) / 60,
        "environment": environment(),
    }
    print(json.dumps(res), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write(res, args.out.with_suffix(".md"))


def write(res: dict, path: Path) -> None:
    env, a = res["environment"], res["args"]
    d = res["ffn_s"]["dense"]["mlp"]
    lines = [
        "# dynamic-k CPU decode speed on SmolLM2-135M",
        "",
        f"Machine: {env.get('cpu', '?')}, {a['threads']} torch thread(s), torch {env.get('torch', '?')}, "
        f"{res['minutes']:.1f} min; {a.get('note', 'nothing else running')}. Command: `.venv/bin/python benchmarks/dynamic_k_speed.py`.",
        "Thresholds at 50 % executed expert compute on calibration text (SiLU model, trained routers).",
        "",
        "| experts | executed (prompt) | runs/token before -> after ordering | FFN decode x (unordered) | FFN x (ordered) "
        "| FFN x (ordered, row-major w_down) | router+select us/token | experts us/token (row-major) "
        "| dense MLP us/token | model decode x b=1 (row-major) | b=8 (row-major) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = 32
    for s in res["runs"]:
        f, fu, fr = res["ffn_s"][s], res["ffn_s"][f"{s} unordered"], res["ffn_s"][f"{s} row-major"]
        b1, b8 = res["decode_b1"], res["decode_b8"]
        r = res["runs"][s]
        lines.append(
            f"| {s} | {res['executed'][s]:.2f} | {r['runs_per_token_before']:.1f} -> {r['runs_per_token_after']:.1f} "
            f"| {d / fu['mlp']:.2f} | **{d / f['mlp']:.2f}** | {d / fr['mlp']:.2f} | {1e6 * f['router'] / n:.0f} "
            f"| {1e6 * f['experts'] / n:.0f} ({1e6 * fr['experts'] / n:.0f}) | {1e6 * d / n:.0f} "
            f"| **{b1[s]:.2f}** ({b1[s + ' row-major']:.2f}) | **{b8[s]:.2f}** ({b8[s + ' row-major']:.2f}) |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
