"""dynamic-k (D2DMoE) on the embedded SmolLM2-135M: quality vs executed compute, and CPU speed.

For each expert size: held-out perplexity ratio vs dense at 75 / 50 / 30 % executed expert compute for
(a) oracle selection (true expert norms), (b) trained routers, both on the original SiLU model, and
(c) trained routers after the activation-sparsification step (ReLU + square Hoyer fine-tune). Then, in
one process and run: FFN decode time (one MLP, one token, real router decisions at 50 %) and whole-model
decode tokens/s (batch 1 and 8) vs dense. Executed MLP FLOPs are counted by FlopCounterMode.

    .venv/bin/python benchmarks/dynamic_k.py            # writes benchmarks/results/dynamic_k.md + png
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import condify
from condify.data import eval_batches, load_model, train_batches
from condify.evaluate import compare_speed, executed_flops, perplexity, set_threads
from condify.methods.dynamic_k import track_executed
from condify.methods.dynamic_k.calibrate import collect, fit_tau, measure, train_routers
from condify.methods.dynamic_k.clustering import balanced_kmeans, permutation
from condify.methods.dynamic_k.modules import converted, expert_norms
from condify.methods.dynamic_k.transform import relayout_
from condify.report import Report
from condify.training import as_batches

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def mlp_cache(
    base: torch.nn.Module, calib: list, size: int, **opts
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the calibration data: every MLP's input x and hidden h (original neuron order).

    Shared by all expert sizes (k-means on |h| profiles and the router targets are computed from it),
    so each (model, size) costs no extra forward passes.
    """
    model = condify.modify(
        copy.deepcopy(base), "dynamic-k", expert_size=size, clustering="coactivation", **opts
    )
    xs: dict[str, list[torch.Tensor]] = {p: [] for p, _ in converted(model)}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, p=p: xs[p].append(a[0].reshape(-1, a[0].shape[-1])))
        for p, m in converted(model)
    ]
    hs = collect(model, calib, 1 << 30, "hidden")
    for h in hooks:
        h.remove()
    return {p: (torch.cat(xs[p]), torch.cat(hs[p])) for p in xs}


def routed(base: torch.nn.Module, size: int, cache: dict, args: argparse.Namespace, **opts) -> tuple:
    """Copy of ``base`` converted with ``size``-neuron experts: co-activation k-means, trained routers."""
    model = condify.modify(
        copy.deepcopy(base), "dynamic-k", expert_size=size, clustering="coactivation", **opts
    )
    data = {}
    with torch.no_grad():
        for p, m in converted(model):
            info = m._condify_patch.info
            x, h = cache[p]
            perm = permutation(balanced_kmeans(h.abs().t(), info["experts"], seed=info["layer"]))
            relayout_(m, info["adapter"], perm)
            data[p] = (x, expert_norms(h[:, perm], info["adapter"].mlp_weights(m)["down"], size))
    fit = train_routers(model, data, args.router_steps, batch_size=128, progress=False)
    return model, data, fit


def sweep(model, data, evals, fractions, ppl_dense, oracle_too: bool) -> dict:
    out = {}
    for frac in fractions:
        for oracle in (True, False) if oracle_too else (False,):
            fit_tau(model, data, 1 - frac, oracle=oracle)
            r = measure(model, evals, oracle=oracle)
            out[(frac, oracle)] = (r["ppl"] / ppl_dense, r["executed"])
    return out


@torch.inference_mode()
def ffn_decode_ratio(dense, model, x: torch.Tensor, layer: int, repeats: int = 5) -> tuple[float, float]:
    """Median over repeats of the time of ``len(x)`` single-token MLP calls: dense / converted."""
    d_mlp = dense.model.layers[layer].mlp
    m_mlp = model.model.layers[layer].mlp
    times = {"d": [], "m": []}
    for _ in range(repeats):
        for key, mlp in (("d", d_mlp), ("m", m_mlp)):
            t = time.perf_counter()
            for i in range(x.shape[0]):
                mlp(x[i : i + 1])
            times[key].append(time.perf_counter() - t)
    with track_executed(model) as st:
        for i in range(x.shape[0]):
            m_mlp(x[i : i + 1])
    p = next(iter(k for k in st if k.endswith(f".{layer}.mlp")))
    return statistics.median(times["d"]) / statistics.median(times["m"]), st[p][0] / st[p][1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,128")
    ap.add_argument("--fractions", default="0.75,0.5,0.3")
    ap.add_argument("--eval-seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-batches", type=int, default=3)
    ap.add_argument("--router-steps", type=int, default=150)
    ap.add_argument("--sparsify-steps", type=int, default=16)
    ap.add_argument("--sparsify-batch", type=int, default=1)
    ap.add_argument("--penalty-weight", type=float, default=3e-5)
    ap.add_argument("--sparsify-lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    set_threads(args.threads)
    t0 = time.time()
    sizes = [int(s) for s in args.sizes.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]

    dense, tok = load_model()
    evals = as_batches(eval_batches(tok, "test", args.eval_seqs, args.seq_len, 4))
    calib = as_batches(train_batches(tok, args.calib_batches, 2, args.seq_len))
    ppl_dense = perplexity(dense, evals, progress=False)
    print(f"dense ppl {ppl_dense:.3f}", flush=True)

    quality: dict[int, dict] = {}
    fits: dict = {}
    cache = mlp_cache(dense, calib, sizes[0])
    print(f"cache {time.time() - t0:.0f}s", flush=True)
    for s in sizes:
        model, data, fit = routed(dense, s, cache, args)
        quality[s] = {"orig": sweep(model, data, evals, fractions, ppl_dense, True)}
        fits[(s, "orig")] = fit
        print(s, "orig", quality[s]["orig"], fit, f"{time.time() - t0:.0f}s", flush=True)
        del model, data

    # stage 1 once (independent of the expert size): ReLU + square-Hoyer fine-tune, KL to dense
    sp = copy.deepcopy(dense)
    condify.modify(sp, "dynamic-k", expert_size=sizes[0], clustering="coactivation")  # no k-means here
    sp_batches = train_batches(tok, args.sparsify_steps, args.sparsify_batch, args.seq_len, seed=1)
    t1 = time.time()
    sres = condify.calibrate(
        sp, [*sp_batches, {"input_ids": evals[0]["input_ids"][:1]}], sparsify=True, sparsify_steps=args.sparsify_steps,
        penalty_weight=args.penalty_weight, sparsify_lr=args.sparsify_lr, cluster=False, router_steps=0,
    )  # fmt: skip
    sparsify_s = time.time() - t1
    condify.unmodify(sp)
    relu_dense = condify.modify(
        copy.deepcopy(sp), "dynamic-k", expert_size=sizes[0], activation="relu", clustering="coactivation"
    )
    sp_ppl = perplexity(relu_dense, evals, progress=False)  # tau = 0: every expert runs
    del relu_dense
    print("sparsify", sres, sp_ppl / ppl_dense, f"{sparsify_s:.0f}s", flush=True)

    speed_models = {}
    cache = mlp_cache(sp, calib, sizes[0], activation="relu")
    for s in sizes:
        model, data, fit = routed(sp, s, cache, args, activation="relu")
        quality[s]["sparse"] = sweep(model, data, evals, fractions, ppl_dense, False)
        fits[(s, "sparse")] = fit
        print(s, "sparse", quality[s]["sparse"], fit, f"{time.time() - t0:.0f}s", flush=True)
        fit_tau(model, data, 0.5)
        speed_models[s] = model

    # speed, one run: FFN decode on real layer inputs, whole-model decode b=1 and b=8
    layer = 15
    xs = []
    h = dense.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: xs.append(a[0][0, :32].clone()))
    with torch.inference_mode():
        dense(evals[0]["input_ids"][:1, :64])
    h.remove()
    ffn = {s: ffn_decode_ratio(dense, m, xs[0], layer) for s, m in speed_models.items()}
    prompt1 = calib[0]["input_ids"][:1, :32]
    prompt8 = torch.cat([b["input_ids"] for b in calib + evals])[:8, :32]
    spd1 = compare_speed(
        {"dense": dense, **{f"s{s}": m for s, m in speed_models.items()}}, prompt1, new_tokens=16, repeats=3
    )
    spd8 = compare_speed(
        {"dense": dense, **{f"s{s}": m for s, m in speed_models.items()}}, prompt8, new_tokens=16, repeats=3
    )
    ids = evals[0]["input_ids"][:1, :128]
    dense_mlp = executed_flops(dense, ids)["mlp"]
    flops = {s: executed_flops(m, ids)["mlp"] / dense_mlp for s, m in speed_models.items()}
    print(
        ffn,
        {k: v["decode_speedup"] for k, v in spd1.items()},
        {k: v["decode_speedup"] for k, v in spd8.items()},
        flops,
        flush=True,
    )
    write(
        args,
        ppl_dense,
        quality,
        fits,
        sres,
        sp_ppl / ppl_dense,
        sparsify_s,
        ffn,
        spd1,
        spd8,
        flops,
        time.time() - t0,
    )


def write(
    args, ppl_dense, quality, fits, sres, sp_ratio, sparsify_s, ffn, spd1, spd8, flops, total_s
) -> None:
    rep = Report("dynamic-k (D2DMoE) on SmolLM2-135M, CPU")
    tokens_sp = args.sparsify_steps * args.sparsify_batch * args.seq_len
    rep.add_text(
        f"Machine: 2-core CPU, `{args.threads}` torch threads, **shared with 3 other engineers' jobs during this "
        f"run (load average 8-12 on 2 cores)**: absolute times are noisy; every speed number is a ratio to dense "
        f"measured in the same process, interleaved. Total benchmark time {total_s / 60:.1f} min.\n\n"
        f"Held-out: {args.eval_seqs} x {args.seq_len} tokens of the test plays (`eval_batches(split='test')`) (dense ppl {ppl_dense:.3f}). "
        f"Calibration: {args.calib_batches} x 2 x {args.seq_len} train tokens (co-activation balanced k-means, "
        f"routers: {args.router_steps} Adam steps on {args.calib_batches * 2 * args.seq_len} tokens per layer (last 10 % held out for the R^2)). Thresholds: per-layer "
        f"tau bisected on calibration data to the target executed fraction (oracle rows: tau fitted on the true "
        f"norms). Executed = measured fraction of expert compute on the held-out text.\n\n"
        f"Sparsification step: ReLU swap + square Hoyer (weight {args.penalty_weight}) fine-tune of the MLP weights, "
        f"KL to the dense model, {args.sparsify_steps} steps x {args.sparsify_batch} x {args.seq_len} = "
        f"{tokens_sp} tokens, lr {args.sparsify_lr}, {sparsify_s / 60:.1f} min. Activation sparsity "
        f"{sres.get('activation_sparsity_before', float('nan')):.3f} (|a|<=1e-3, SiLU) -> "
        f"{sres.get('activation_sparsity_after', float('nan')):.3f} (exact zeros, ReLU); cost of the step itself "
        f"(all experts run): ppl ratio {sp_ratio:.3f}."
    )
    headers = [
        "expert size",
        "target executed",
        "oracle (SiLU)",
        "routers (SiLU)",
        "executed (routers, SiLU)",
        "routers (sparsified)",
        "executed (routers, sparsified)",
    ]
    rows = []
    for s, q in quality.items():
        for f in sorted({k[0] for k in q["orig"]}, reverse=True):
            rows.append(
                [
                    s,
                    f,
                    q["orig"][(f, True)][0],
                    q["orig"][(f, False)][0],
                    q["orig"][(f, False)][1],
                    q["sparse"][(f, False)][0],
                    q["sparse"][(f, False)][1],
                ]
            )
    rep.add_heading("Held-out perplexity ratio vs dense")
    rep.add_table(headers, rows)
    rep.add_table(
        ["expert size", "model", "router MSE before", "after", "R^2"],
        [[s, k, v["router_mse_before"], v["router_mse_after"], v["router_r2"]] for (s, k), v in fits.items()],
        caption="router regression on held-out calibration tokens (mean over layers)",
    )
    rep.add_heading("Speed at 50 % executed (sparsified model, trained routers)")
    rows = []
    for s in ffn:
        rows.append(
            [
                s,
                ffn[s][1],
                flops[s],
                ffn[s][0],
                spd1[f"s{s}"]["decode_speedup"],
                spd8[f"s{s}"]["decode_speedup"],
            ]
        )
    rep.add_table(
        [
            "expert size",
            "layer-15 executed (decode)",
            "MLP FLOPs vs dense (128-token forward, router incl.)",
            "FFN decode speedup",
            "model decode speedup b=1",
            "b=8",
        ],
        rows,
    )
    sizes = list(quality)
    fr = sorted({k[0] for k in quality[sizes[0]]["orig"]})
    series = {}
    for s in sizes:
        series[f"oracle SiLU s={s}"] = [quality[s]["orig"][(f, True)][0] for f in fr]
        series[f"routers sparsified s={s}"] = [quality[s]["sparse"][(f, False)][0] for f in fr]
    rep.plot_lines(
        "dynamic_k_frontier",
        [f * 100 for f in fr],
        series,
        xlabel="target executed expert compute (%)",
        ylabel="ppl ratio vs dense",
        title="dynamic-k quality frontier",
        logy=True,
    )
    tmp = Path(tempfile.mkdtemp())
    rep.write(tmp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp / "report.md", out / "dynamic_k.md")
    shutil.copy(tmp / "dynamic_k_frontier.png", out / "dynamic_k_frontier.png")
    print(f"wrote {out / 'dynamic_k.md'}")


if __name__ == "__main__":
    main()
