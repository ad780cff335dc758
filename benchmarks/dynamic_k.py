"""dynamic-k (D2DMoE) on the embedded SmolLM2-135M: quality vs executed compute, and CPU speed.

For each expert size: held-out perplexity ratio vs dense at 75 / 50 / 30 % executed expert compute for
(a) oracle selection (true expert norms), (b) trained routers, both on the original SiLU model, and
(c) trained routers after the activation-sparsification step (ReLU + square Hoyer fine-tune). Then, in
one process and run: FFN decode time (one MLP, one token, real router decisions at 50 %) and whole-model
decode tokens/s (batch 1 and 8) vs dense. Executed MLP FLOPs are counted by FlopCounterMode.

    .venv/bin/python benchmarks/dynamic_k.py            # writes benchmarks/results/dynamic_k.md + png
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import harness
import torch

import condify
from condify.batches import as_batches
from condify.data import eval_batches, train_batches
from condify.evaluate import executed_flops, perplexity
from condify.methods.dynamic_k import track_executed
from condify.methods.dynamic_k.calibrate import fit_tau, measure
from condify.report import Report

LAYER = 15
QUICK = dict(
    sizes="128", fractions="0.5", eval_seqs=1, seq_len=128, calib_batches=1, router_steps=2, sparsify_steps=2
)


def sweep(
    model: torch.nn.Module, data: dict, evals: list, fracs: list[float], ppl_dense: float, oracle_too: bool
) -> dict:
    """{(fraction, oracle): (ppl ratio, executed)} with thresholds fitted to each target fraction."""
    out = {}
    for frac in fracs:
        for oracle in (True, False) if oracle_too else (False,):
            fit_tau(model, data, 1 - frac, oracle=oracle)
            r = measure(model, evals, oracle=oracle)
            out[(frac, oracle)] = (r["ppl"] / ppl_dense, r["executed"])
    return out


@torch.inference_mode()
def ffn_decode_ratio(
    dense: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, layer: int, repeats: int = 5
) -> tuple[float, float]:
    """(dense / converted median time of ``len(x)`` single-token MLP calls, executed fraction)."""
    m_mlp = model.model.layers[layer].mlp
    calls = {"d": harness.per_token(dense.model.layers[layer].mlp, x), "m": harness.per_token(m_mlp, x)}
    t = harness.medians(harness.interleaved(calls, repeats, warmup=0, rotate=False))
    with track_executed(model) as st:
        calls["m"]()
    p = next(iter(k for k in st if k.endswith(f".{layer}.mlp")))
    return t["d"] / t["m"], st[p][0] / st[p][1]


def main() -> None:
    ap = harness.parser(__doc__, threads=1, out=harness.RESULTS, out_help="results folder",
                render="only re-render the markdown from a saved dynamic_k.json (default: the one in --out)")  # fmt: skip
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
    ap.add_argument("--activation", default="relu", choices=["relu", "keep"], help="stage-1 activation")
    ap.add_argument(
        "--sparsified-only", action="store_true", help="only stage 1 + routers (no SiLU rows, no speed)"
    )
    args = harness.parse(ap, QUICK)
    if args.render is not None:
        write(harness.read_json(Path(args.render or args.out / "dynamic_k.json")), args.out)
        return
    t0 = time.time()
    sizes = [int(s) for s in args.sizes.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    dense, tok = harness.start(args)
    evals = as_batches(eval_batches(tok, "test", args.eval_seqs, args.seq_len, 4))
    calib = as_batches(train_batches(tok, args.calib_batches, 2, args.seq_len))
    ppl_dense = perplexity(dense, evals, progress=False)
    print(f"dense ppl {ppl_dense:.3f}", flush=True)

    quality: dict[int, dict] = {s: {} for s in sizes}
    act = {"activation": "relu"} if args.activation == "relu" else {}
    fits: dict = {}
    cache = harness.mlp_cache(dense, calib, sizes[0])
    print(f"cache {time.time() - t0:.0f}s", flush=True)
    for s in sizes if not args.sparsified_only else []:
        model, data, fit = harness.routed(dense, s, cache, args.router_steps)
        quality[s]["orig"] = sweep(model, data, evals, fractions, ppl_dense, True)
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
        activation=act.get("activation"), holdout=1,
    )  # fmt: skip
    sparsify_s = time.time() - t1
    condify.unmodify(sp)
    relu_dense = harness.dynamic_k_copy(sp, sizes[0], **act)
    sp_ppl = perplexity(relu_dense, evals, progress=False)  # tau = 0: every expert runs
    del relu_dense
    print("sparsify", sres, sp_ppl / ppl_dense, f"{sparsify_s:.0f}s", flush=True)
    sparsify = {**{k: v for k, v in sres.items() if k != "tau"}, "ppl_ratio_tau0": sp_ppl / ppl_dense}

    speed_models = {}
    cache = harness.mlp_cache(sp, calib, sizes[0], **act)
    for s in sizes:
        model, data, fit = harness.routed(sp, s, cache, args.router_steps, **act)
        quality[s]["sparse"] = sweep(model, data, evals, fractions, ppl_dense, False)
        fits[(s, "sparse")] = fit
        print(s, "sparse", quality[s]["sparse"], fit, f"{time.time() - t0:.0f}s", flush=True)
        fit_tau(model, data, 0.5)
        speed_models[s] = model
    fits_out = {f"{sz} {k}": v for (sz, k), v in fits.items()}
    if args.sparsified_only:
        extra = {
            "args": vars(args),
            "sparsify": sparsify,
            "sparsify_s": sparsify_s,
            "quality": {
                str(sz): {str(f): quality[sz]["sparse"][(f, False)] for f in fractions} for sz in sizes
            },
            "fits": fits_out,
        }
        harness.write_json(args.out / f"dynamic_k_{args.activation}.json", extra)
        return

    # speed, one run: FFN decode on real layer inputs, whole-model decode b=1 and b=8
    xs = harness.mlp_inputs(dense, evals[0]["input_ids"][:1, :64], LAYER)
    ffn = {s: ffn_decode_ratio(dense, m, xs, LAYER) for s, m in speed_models.items()}
    spd = harness.decode_speedups(
        {"dense": dense, **{f"s{s}": m for s, m in speed_models.items()}}, calib, evals, 3
    )
    ids = evals[0]["input_ids"][:1, :128]
    dense_mlp = executed_flops(dense, ids)["mlp"]
    flops = {s: executed_flops(m, ids)["mlp"] / dense_mlp for s, m in speed_models.items()}
    print(ffn, spd["b1"], spd["b8"], flops, flush=True)
    res = {
        "args": vars(args),
        "ppl_dense": ppl_dense,
        "quality": {
            str(sz): {
                "oracle": {str(f): q["orig"][(f, True)] for f in fractions},
                "routers": {str(f): q["orig"][(f, False)] for f in fractions},
                "routers_sparsified": {str(f): q["sparse"][(f, False)] for f in fractions},
            }
            for sz, q in quality.items()
        },
        "fits": fits_out,
        "sparsify": sparsify,
        "sparsify_s": sparsify_s,
        "speed": {
            str(sz): {
                "layer_executed": ffn[sz][1],
                "mlp_flops_ratio": flops[sz],
                "ffn_decode_speedup": ffn[sz][0],
                "model_decode_speedup_b1": spd["b1"][f"s{sz}"],
                "model_decode_speedup_b8": spd["b8"][f"s{sz}"],
            }
            for sz in speed_models
        },
        "total_s": time.time() - t0,
    }
    harness.write_json(args.out / "dynamic_k.json", res)
    write(res, args.out)


def write(res: dict, out: Path) -> None:
    """Render ``res`` (as saved in ``dynamic_k.json``) to ``out/dynamic_k.md`` and the frontier plot."""
    a, sp = res["args"], res["sparsify"]
    rep = Report("dynamic-k (D2DMoE) on SmolLM2-135M, CPU", harness.environment())
    tokens_sp = a["sparsify_steps"] * a["sparsify_batch"] * a["seq_len"]
    rep.add_text(
        f"Machine: 2-core AMD EPYC CPU, {a['threads']} torch thread(s), **shared with 3 other engineers' jobs "
        f"during this run (load average 8-17 on 2 cores; a 512-token forward took ~15 s instead of ~1 s)**. "
        f"Every speed number is a ratio to dense measured in the same process, interleaved; absolute times are "
        f"not meaningful. Total benchmark time {res['total_s'] / 60:.1f} min.\n\n"
        f"Commands: `.venv/bin/python benchmarks/dynamic_k.py` (main tables and speed), "
        f"`.venv/bin/python benchmarks/dynamic_k.py --activation keep --sparsified-only --sparsify-steps 32` "
        f"(saved to `dynamic_k_keep.json`), `.venv/bin/python benchmarks/dynamic_k.py --activation relu "
        f"--sparsified-only --sparsify-steps 60 --sparsify-batch 2 --sizes 32` (saved to `dynamic_k_relu.json`); re-render with `--render benchmarks/results/dynamic_k.json`.\n\n"
        f"Held-out: {a['eval_seqs']} x {a['seq_len']} tokens of the test plays (`eval_batches(split='test')`, "
        f"dense ppl {res['ppl_dense']:.3f}). Calibration: {a['calib_batches']} x 2 x {a['seq_len']} train tokens "
        f"= {a['calib_batches'] * 2 * a['seq_len']} tokens per layer for co-activation balanced k-means and the "
        f"routers ({a['router_steps']} Adam steps, batch 128; last 10 % held out for MSE/R^2). Thresholds: "
        f"per-layer tau bisected on the calibration tokens to the target executed fraction (oracle: on the true "
        f"norms, router rows: on the router scores). Cells are `ppl ratio @ executed fraction`, both measured on "
        f"the held-out text.\n\n"
        f"Sparsification step: ReLU swap + square Hoyer (weight {a['penalty_weight']}) fine-tune of the MLP "
        f"weights, KL to the dense model, {a['sparsify_steps']} steps x {a['sparsify_batch']} x {a['seq_len']} = "
        f"{tokens_sp} tokens, lr {a['sparsify_lr']}, {res['sparsify_s'] / 60:.1f} min. Activation sparsity "
        f"{sp.get('activation_sparsity_before', float('nan')):.3f} (|a| <= 1e-3, SiLU) -> "
        f"{sp.get('activation_sparsity_after', float('nan')):.3f} (|a| <= 1e-3, ReLU); cost of the step itself "
        f"(tau = 0, every expert runs): ppl ratio {sp['ppl_ratio_tau0']:.3f}."
    )

    def cell(v: list[float]) -> str:
        return f"{v[0]:.3g} @ {v[1]:.2f}"

    rows = []
    for size, q in res["quality"].items():
        for f in sorted(q["oracle"], key=float, reverse=True):
            rows.append(
                [size, f, cell(q["oracle"][f]), cell(q["routers"][f]), cell(q["routers_sparsified"][f])]
            )
    rep.add_heading("Held-out perplexity ratio vs dense @ executed expert compute")
    rep.add_text(
        harness.table(
            [
                "expert size",
                "target executed",
                "oracle (SiLU)",
                "routers (SiLU)",
                "routers (after sparsification)",
            ],
            rows,
        )
    )
    rep.add_text(
        harness.table(
            ["expert size / model", "router MSE before", "after", "R^2 vs per-expert mean"],
            [
                [k, v["router_mse_before"], v["router_mse_after"], v["router_r2"]]
                for k, v in res["fits"].items()
            ],
            caption="router regression on held-out calibration tokens (mean over layers)",
        )
    )
    titles = {
        "keep": "Variant: keep SiLU, square-Hoyer fine-tune only",
        "relu": "Variant: ReLU + square Hoyer with a longer stage 1",
    }
    for name, title in titles.items():
        extra = out / f"dynamic_k_{name}.json"
        if not extra.exists():
            continue
        e = harness.read_json(extra)
        ea, es = e["args"], e["sparsify"]
        rep.add_heading(title)
        rep.add_text(
            f"Same pipeline, stage 1 = {'ReLU swap + ' if name == 'relu' else ''}square Hoyer: "
            f"{ea['sparsify_steps']} steps x {ea['sparsify_batch']} x {ea['seq_len']} tokens, Hoyer weight "
            f"{ea['penalty_weight']}, lr {ea['sparsify_lr']} ({e['sparsify_s'] / 60:.1f} min). Activation sparsity "
            f"(|a| <= 1e-3) {es.get('activation_sparsity_before', float('nan')):.3f} -> "
            f"{es.get('activation_sparsity_after', float('nan')):.3f}; cost of the step (tau = 0): ppl ratio "
            f"{es['ppl_ratio_tau0']:.3f}."
        )
        rep.add_text(
            harness.table(
                ["expert size", "target executed", "routers after this stage 1"],
                [[sz, f, cell(v)] for sz, q in e["quality"].items() for f, v in q.items()],
            )
        )
    rep.add_heading("Speed at 50 % target (sparsified model, trained routers)")
    rep.add_text(
        harness.table(
            [
                "expert size",
                "layer-15 executed (decode tokens)",
                "MLP FLOPs vs dense (FlopCounterMode, 128 tokens, router incl.)",
                "FFN decode speedup (layer 15, 32 tokens)",
                "model decode speedup b=1",
                "b=8",
            ],
            [
                [
                    size,
                    v["layer_executed"],
                    v["mlp_flops_ratio"],
                    v["ffn_decode_speedup"],
                    v["model_decode_speedup_b1"],
                    v["model_decode_speedup_b8"],
                ]
                for size, v in res["speed"].items()
            ],
        )
    )
    series = {}
    for size, q in res["quality"].items():
        for name in ("oracle", "routers", "routers_sparsified"):
            pts = sorted(q[name].values(), key=lambda v: v[1])
            series[f"{name} s={size}"] = (
                [100 * v[1] for v in pts],
                [v[0] for v in pts],
            )

    def draw(ax: object) -> None:
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("executed expert compute on held-out text (%)")
        ax.set_ylabel("perplexity ratio vs dense")
        ax.axhline(1.11, color="gray", linestyle="--", linewidth=1)
        ax.set_title("dynamic-k frontier (dashed: x1.11)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    rep.add_plot("dynamic_k_frontier", draw, caption="quality frontier")
    if res.get("findings"):  # written by hand for the recorded run, stored next to its numbers
        rep.add_heading("Findings (this run)")
        rep.add_text(res["findings"])
    print(f"wrote {rep.write(out, 'dynamic_k.md')}")


if __name__ == "__main__":
    main()
