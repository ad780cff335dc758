"""mod-threshold on the embedded SmolLM2-135M: quality, KV bytes and speed vs dense at several capacities.

For each capacity: ``modify`` (every other layer gated, 14 of 30), router-only calibration
(``train="routers"``, KL to the dense model), held-out perplexity; then continued training of all
decoder layers from there (``train="all"``), held-out perplexity again. Then, in one interleaved
run: prefill (512 and 2048 tokens, batch 1) and decode (batch 1) speed, and KV-cache bytes after a
512-token prefill, all as ratios to the dense model in the same process.

    .venv/bin/python benchmarks/mod_threshold.py            # the committed numbers (see --help)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import harness
import torch

import condify
from condify import data, evaluate
from condify.methods.mod_threshold import keep_rates

QUICK = dict(capacities=[0.5], router_steps=1, steps=1, seq_len=32, fit_batches=1, eval_sequences=1,
             eval_len=64, repeats=1)  # fmt: skip

NOTES = """## Notes on this run (targets)

- **Perplexity ≤ 1.10× at capacity 0.75 after calibration: met, ×1.070** (43.5k training tokens: 10
  router steps + 160 steps of 2 × 128 tokens, ~20 min on one core). Capacity 0.5 costs ×1.31 and 0.9
  ×1.02 with the same budget. The previous run of this file (×5.0 at 0.75) differed in four ways, each
  measured: the default gated layers now start at layer 3 (layer 1 alone is the most expensive layer
  to gate, see the tables above); 4 sink tokens always run (a quick check, not part of this file's
  runs: training-free at capacity 0.75 on the old layer set, 4 × 256 held-out tokens, ×9.2 without
  sinks, ×4.3 with); the router learning rate is 1e-5 instead of 1e-3 (in a first run of this
  benchmark with 1e-3 — 120 steps of 2 × 256 tokens, output not kept — the KL loss rose from 0.12 to
  1.25 and held-out perplexity at 0.75 ended at ×2.45, worse than its router-only ×1.73: Adam moves every router weight by ~lr per step, and a few residual coordinates are huge, so
  the routing decisions drift faster than the layers adapt); and the decoder layers train at 3e-4
  instead of 5e-5.
- **KV bytes ≤ 0.6× of the gated layers at capacity 0.5: met** (0.48×; 0.78× for the whole cache, 17
  of the 30 layers are not gated). After a 512-token prefill of held-out text; the bytes include the
  int64 slot index.
- **Keep-rate within ±0.05 of 0.5 for every gated layer: met** on the held-out text (0.480–0.537 over
  13 layers, 4,096 tokens); the biases are fitted on 16 × 2 × 128 training tokens.
- **Prefill ≥ 1.25× at capacity 0.5: 1.24× at 512 tokens (missed by 0.01), 1.40× at 2048.** The ceiling
  at 512 tokens, if a layer's time were proportional to its tokens, is 1 / (1 − 13/30 · 0.51) = 1.28×.
  The profile (`mod_threshold_profile.md`, same machine) shows where the rest goes: a gated layer at
  keep 0.49 takes 0.61 of its dense time, not 0.49 — the matmuls on ~250 compacted rows run below the
  speed of 512-row ones (all `aten::mm` together: 421 ms vs 505 ms dense, 393 ms if proportional),
  and the router, compaction, gathers, scatter-add and the extra `cat`s cost ~1 ms per gated layer
  (~4 % of a 25 ms layer). At 2048 tokens attention is a larger share of a layer and compacting it
  saves quadratically, hence 1.40×. Gating more layers (`layers=`) raises the ceiling.
- Decode (batch 1, 64-token prompt, 16 new tokens): 1.23× at capacity 0.5, 1.08× at 0.75, and 0.85×
  at 0.9, where the per-step cost of routing and compacting in 13 layers is more than the ~10 % of
  layer work skipped.
- All timings on a quiet machine (no other jobs, load average < 0.5 before the runs).
"""


def _ppl(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    return evaluate.perplexity(model, batches, progress=False)


def _kv(model: torch.nn.Module, ids: torch.Tensor, gated: list[int] | None = None) -> tuple[int, int]:
    """(all layers, gated layers only) KV bytes after a prefill of ``ids``. Reads the cache's layers."""
    with torch.inference_mode():
        cache = evaluate.output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    total = evaluate.kv_cache_bytes(cache)
    idx = gated or []
    part = 0
    for i in idx:
        layer = cache.layers[i]
        part += layer.nbytes() if hasattr(layer, "nbytes") else layer.keys.nbytes + layer.values.nbytes
    return total, part


def _prefill_times(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int, warmup: bool = True
) -> dict[str, float]:
    """Median prefill seconds per model, interleaved (rotating order), after one warm-up round."""
    calls = {n: (lambda m=m: m(input_ids=ids, use_cache=True, logits_to_keep=1)) for n, m in models.items()}
    with torch.inference_mode():
        return harness.medians(harness.interleaved(calls, repeats, int(warmup)))


def _setup(args: argparse.Namespace):
    """Threads and seed; the dense model, its tokenizer and the held-out batches."""
    dense, tok = harness.start(args)
    test = data.eval_batches(tok, "test", args.eval_sequences, args.eval_len, batch_size=4)
    return dense, tok, test


def _quality_file(args: argparse.Namespace, c: float) -> Path:
    return args.out.with_name(f"{args.out.stem}_quality_c{c}.json")


def quality(args: argparse.Namespace) -> None:
    """Router-only, then full calibration per capacity; held-out ppl, keep-rates, KV bytes.

    One JSON file per capacity (``<out>_quality_c<c>.json``), so capacities can run in parallel processes.
    """
    dense, tok, test = _setup(args)
    n_batches = max(args.router_steps + args.steps, args.fit_batches, 1)
    train = data.train_batches(tok, n_batches, batch_size=args.batch, seq_len=args.seq_len)
    ids512 = torch.cat(test).flatten()[:512][None]
    dense_ppl = _ppl(dense, test)
    dense_kv, _ = _kv(dense, ids512)
    print(f"dense ppl {dense_ppl:.3f}, kv {dense_kv}", flush=True)
    for c in args.capacities:
        t0 = time.time()
        model = copy.deepcopy(dense)
        condify.modify(model, method="mod-threshold", capacity=c, sink_tokens=args.sink_tokens)
        gated = condify.applied_configs(model)[0].resolve(len(model.model.layers))
        r1 = condify.calibrate(
            model, train, capacity=c, train="routers", steps=args.router_steps,
            fit_batches=args.fit_batches, holdout=0, progress=False,
        )  # fmt: skip
        ppl_router = _ppl(model, test)
        held_router = keep_rates(model, test)
        r2 = condify.calibrate(
            model, train[args.router_steps :], capacity=c, train="all", steps=args.steps, lr=args.lr,
            fit_batches=args.fit_batches, holdout=0, progress=False,
        )  # fmt: skip
        ppl_full = _ppl(model, test)
        held = keep_rates(model, test)
        kv, kv_gated = _kv(model, ids512, gated)
        dense_gated = dense_kv * len(gated) / dense.config.num_hidden_layers
        row = {
            "capacity": c,
            "gated_layers": gated,
            "sink_tokens": args.sink_tokens,
            "lr": args.lr,
            "ppl_router": ppl_router / dense_ppl,
            "ppl_full": ppl_full / dense_ppl,
            "tokens_router": r1["tokens"],
            "tokens_full": r1["tokens"] + r2["tokens"],
            "keep_router": held_router,
            "keep_min": min(held.values()),
            "keep_max": max(held.values()),
            "keep": held,
            "keep_fit": r2["keep_rates"],
            "kv_ratio": kv / dense_kv,
            "kv_gated_ratio": kv_gated / dense_gated,
            "dense_ppl": dense_ppl,
            "seconds": time.time() - t0,
            "losses_router": r1["losses"],
            "losses_full": r2["losses"],
            "environment": harness.environment(),
        }
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("losses")}), flush=True)
        harness.write_json(_quality_file(args, c), row)


def layer_choice(args: argparse.Namespace) -> None:
    """Which layers to gate: per-layer sensitivity (KL to dense, one layer gated alone at capacity 0.5,
    training-free), then training-free held-out perplexity of whole layer sets at each capacity."""
    from condify.methods.mod_threshold import ModThresholdConfig, layer_sensitivity

    dense, tok, test = _setup(args)
    fit = data.train_batches(tok, args.fit_batches, batch_size=args.batch, seq_len=args.seq_len)
    t0 = time.time()
    sens = layer_sensitivity(dense, fit, capacity=0.5, sink_tokens=args.sink_tokens, progress=False)
    print(json.dumps({"sensitivity": sens}), flush=True)
    n = len(dense.model.layers)
    default = ModThresholdConfig().resolve(n)
    ranked = sorted(sens, key=sens.__getitem__)
    sets = {
        "every other from 1 (version-1 default)": list(range(1, n - 1, 2)),
        "every other from 3 (default)": default,
        f"{len(default)} least sensitive": sorted(ranked[: len(default)]),
        f"{len(default) + 1} least sensitive": sorted(ranked[: len(default) + 1]),
    }
    dense_ppl = _ppl(dense, test)
    ppl: dict[str, dict[str, float]] = {}
    for name, layers in sets.items():
        for c in args.capacities:
            model = copy.deepcopy(dense)
            condify.modify(model, "mod-threshold", capacity=c, layers=layers, sink_tokens=args.sink_tokens)
            condify.calibrate(model, fit, capacity=c, steps=0, holdout=0, progress=False)
            ppl.setdefault(name, {})[str(c)] = _ppl(model, test) / dense_ppl
            print(name, c, ppl[name][str(c)], flush=True)
    out = {"sensitivity": sens, "sets": sets, "ppl_ratio": ppl, "seconds": time.time() - t0}
    harness.write_json(args.out.with_name(args.out.stem + "_layers.json"), out)


def speed(args: argparse.Namespace) -> None:
    """Prefill/decode timings vs dense, interleaved; routers from the training-free init + bias fit."""
    dense, tok, test = _setup(args)
    fit = data.train_batches(tok, 2, batch_size=1, seq_len=256)
    flat = torch.cat(data.eval_batches(tok, "test", 4, 512, batch_size=4)).flatten()
    ids512, ids2048 = flat[:512][None], flat[:2048][None]
    models, kept = {"dense": dense}, {}
    for c in args.capacities:
        model = copy.deepcopy(dense)
        condify.modify(model, method="mod-threshold", capacity=c)
        condify.calibrate(model, fit, capacity=c, steps=0, holdout=0, progress=False)
        kept[c] = statistics.mean(keep_rates(model, ids512).values())
        models[f"c={c}"] = model
    t0 = time.time()
    p512 = _prefill_times(models, ids512, args.repeats)
    p2048 = _prefill_times(models, ids2048, args.repeats, warmup=False)  # warmed up at 512 tokens
    dec = {
        n: evaluate.time_decode(m, ids512[:, :64], new_tokens=16, repeats=args.repeats)
        for n, m in models.items()
    }
    out = {
        "prefill512_s": p512,
        "prefill2048_s": p2048,
        "decode_tok_s": dec,
        "keep_on_prompt": {str(k): v for k, v in kept.items()},
        "seconds": time.time() - t0,
        "environment": harness.environment(),
    }
    harness.write_json(args.out.with_name(args.out.stem + "_speed.json"), out)
    print(json.dumps(out), flush=True)


def profile(args: argparse.Namespace) -> None:
    """Where prefill time goes: whole-model prefill of 512 tokens with ``torch.profiler``, dense vs capacity
    0.5 (training-free routers), the top ops by self CPU time, and the per-layer time of gated vs plain
    layers (forward hooks, median over repeats). Writes ``<out>_profile.md``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dense, tok, _ = _setup(args)
    fit = data.train_batches(tok, 2, batch_size=1, seq_len=256)
    ids512 = torch.cat(data.eval_batches(tok, "test", 1, 512, batch_size=1)).flatten()[:512][None]
    model = copy.deepcopy(dense)
    condify.modify(model, method="mod-threshold", capacity=0.5)
    condify.calibrate(model, fit, capacity=0.5, steps=0, holdout=0, progress=False)
    keep = keep_rates(model, ids512)
    layer_t: dict[str, dict[int, list[float]]] = {"dense": {}, "c=0.5": {}}
    lines = [f"# mod-threshold prefill profile, 512 tokens, capacity 0.5 (mean keep on the prompt "
             f"{statistics.mean(keep.values()):.2f}), {args.threads} thread(s)", ""]  # fmt: skip
    for name, m in (("dense", dense), ("c=0.5", model)):
        hooks = []
        for i, layer in enumerate(m.model.layers):
            t0: dict[str, float] = {}
            hooks.append(
                layer.register_forward_pre_hook(lambda mod, a, t0=t0: t0.update(t=time.perf_counter()))
            )
            hooks.append(
                layer.register_forward_hook(
                    lambda mod, a, o, t0=t0, i=i, name=name: (
                        layer_t[name].setdefault(i, []).append(time.perf_counter() - t0["t"])
                    )
                )
            )
        with torch.inference_mode():
            for _ in range(args.repeats + 1):
                m(input_ids=ids512, use_cache=True, logits_to_keep=1)
        for h in hooks:
            h.remove()
        with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            m(input_ids=ids512, use_cache=True, logits_to_keep=1)
        lines += [f"## {name}: top ops by self CPU time", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), "```", ""]  # fmt: skip
    gated = set(keep)
    med = {n: {i: statistics.median(v[1:]) for i, v in t.items()} for n, t in layer_t.items()}
    g = [med["c=0.5"][i] / med["dense"][i] for i in gated]
    u = [med["c=0.5"][i] / med["dense"][i] for i in med["dense"] if i not in gated]
    summary = [
        "## per-layer time, converted / dense (median over repeats)",
        "",
        f"- gated layers (keep ~{statistics.mean(keep.values()):.2f}): mean ratio {statistics.mean(g):.3f} "
        f"(ideal at this keep-rate: {statistics.mean(keep.values()):.3f} plus the router)",
        f"- ungated layers: mean ratio {statistics.mean(u):.3f} (ideal 1.0)",
        f"- dense layer time: {1e3 * statistics.mean(med['dense'].values()):.1f} ms; "
        f"sum over layers dense {1e3 * sum(med['dense'].values()):.0f} ms, converted "
        f"{1e3 * sum(med['c=0.5'].values()):.0f} ms",
        "",
        harness.table(
            ["layer", "keep", "dense ms", "converted ms", "ratio"],
            [[i, f"{keep[i]:.2f}" if i in keep else "-", f"{1e3 * med['dense'][i]:.1f}",
              f"{1e3 * med['c=0.5'][i]:.1f}", f"{med['c=0.5'][i] / med['dense'][i]:.3f}"]
             for i in sorted(med["dense"])],
        ),
    ]  # fmt: skip
    harness.write_markdown(args.out.with_name(args.out.stem + "_profile.md"), lines + summary)
    print("\n".join(summary))


def main() -> None:
    p = harness.parser(__doc__, threads=2, out=harness.RESULTS / "mod_threshold.md", out_help="report path")
    p.add_argument(
        "part", choices=["quality", "layers", "speed", "profile", "report", "all"], nargs="?", default="all"
    )
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--router-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the decoder layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sink-tokens", type=int, default=4, help="first tokens that take every layer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fit-batches", type=int, default=8, help="batches the router biases are fitted on")
    p.add_argument("--eval-sequences", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = harness.parse(p, QUICK)
    if args.part in ("quality", "all"):
        quality(args)
    if args.part in ("speed", "all"):
        speed(args)
    if args.part == "profile":
        profile(args)
    if args.part == "layers":
        layer_choice(args)
    if args.part in ("report", "all"):
        _write(args)


def _write(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: Path = args.out
    rows = [harness.read_json(f) for f in out.parent.glob(f"{out.stem}_quality_c*.json")]
    rows.sort(key=lambda r: r["capacity"])
    speed_file = out.with_name(out.stem + "_speed.json")
    sp = harness.read_json(speed_file) if speed_file.exists() else None
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in rows:
        keep = {int(i): v for i, v in r["keep"].items()}
        ax[0].plot(list(keep), list(keep.values()), "o-", label=f"target {r['capacity']}")
        ax[0].axhline(r["capacity"], color="gray", lw=0.5, ls=":")
    ax[0].set(
        xlabel="gated layer", ylabel="keep-rate (held-out)", title="keep-rate per gated layer", ylim=(0, 1)
    )
    ax[0].legend()
    caps = [r["capacity"] for r in rows]
    ax[1].plot(caps, [r["ppl_router"] for r in rows], "o-", label="router-only")
    ax[1].plot(caps, [r["ppl_full"] for r in rows], "o-", label="+ continued training")
    ax[1].set(xlabel="capacity", ylabel="perplexity / dense", yscale="log", title="held-out perplexity ratio")
    ax[1].legend()
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=110)

    nan: dict[str, float] = {}
    p512, p2048, dec = (sp[k] if sp else nan for k in ("prefill512_s", "prefill2048_s", "decode_tok_s"))
    env = (sp or rows[0])["environment"]
    r0 = rows[0]
    lines = [
        "# mod-threshold on SmolLM2-135M (embedded), CPU",
        "",
        f"Machine: {env['device']}, {env['cpu_count']} cores, torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['date']}. Quality runs: {r0['environment']['torch_threads']} torch "
        f"thread(s) per process; speed: {sp['environment']['torch_threads'] if sp else '-'} threads, alone on "
        "the machine. Every speed ratio is measured in one process with the models interleaved (medians).",
        "",
        "Commands (the three quality capacities ran as parallel processes, one thread each; then speed, "
        "profile and layers alone on the machine; then this file):",
        "",
        "```",
        f".venv/bin/python benchmarks/mod_threshold.py quality --capacities 0.75 --router-steps "
        f"{args.router_steps} --steps {args.steps} --batch {args.batch} --seq-len {args.seq_len} "
        f"--fit-batches {args.fit_batches} --eval-sequences {args.eval_sequences} --eval-len {args.eval_len} "
        "--threads 1",
        "(the same with --capacities 0.5, and with --capacities 0.9)",
        f".venv/bin/python benchmarks/mod_threshold.py speed --capacities "
        f"{' '.join(sp['keep_on_prompt']) if sp else '0.5'} --repeats {args.repeats}",
        ".venv/bin/python benchmarks/mod_threshold.py profile --repeats 5",
        ".venv/bin/python benchmarks/mod_threshold.py layers --capacities 0.75 0.5 --batch 2 --seq-len 128 "
        "--fit-batches 8 --eval-sequences 16 --eval-len 256",
        f".venv/bin/python benchmarks/mod_threshold.py report --router-steps {args.router_steps} --steps "
        f"{args.steps} --batch {args.batch} --seq-len {args.seq_len} --fit-batches {args.fit_batches} "
        f"--eval-sequences {args.eval_sequences} --eval-len {args.eval_len} --repeats {args.repeats}",
        "```",
        "",
        f"Gated layers (the default): {', '.join(map(str, r0['gated_layers']))} ({len(r0['gated_layers'])} of "
        f"30), threshold 0.5, {r0['sink_tokens']} sink tokens. Held-out: {args.eval_sequences} × "
        f"{args.eval_len} tokens of the test plays, dense perplexity {r0['dense_ppl']:.2f}. Calibration "
        f"text: train plays, batches of {args.batch} × {args.seq_len} tokens. **Router-only**: training-free "
        "router init (ridge regression of each token's relative layer update) and bias fit, then "
        f"{args.router_steps} steps training the routers with the model frozen (KL to dense, router lr 1e-5, "
        f"the default). **+ training**: from there, {args.steps} steps training all decoder layers and "
        f"routers (KL to dense, lr {r0['lr']:g}, routers 1e-5), capacity walked 1.0 → target over half the "
        "steps; router biases "
        f"fitted to the target on {args.fit_batches} calibration batches at the end of each stage. "
        "Keep-rates: hard threshold on the held-out text.",
        "",
    ]
    headers = ["capacity", "ppl ×, router-only", "ppl ×, + training", "training tokens (router / total)",
               "keep-rate held-out, min–max over layers", "KV bytes × (all layers / gated layers)", "prefill 512 ×",
               "prefill 2048 ×", "decode ×"]  # fmt: skip
    cells = []
    for r in rows:
        n = f"c={r['capacity']}"

        def ratio(num: dict, den: dict, n: str = n) -> str:
            return f"{num['dense'] / den[n]:.2f}" if n in den and "dense" in num else "n/a"

        decode = f"{dec[n] / dec['dense']:.2f}" if n in dec else "n/a"
        cells.append([
            str(r["capacity"]), f"{r['ppl_router']:.2f}", f"{r['ppl_full']:.3f}",
            f"{r['tokens_router']:,} / {r['tokens_full']:,}", f"{r['keep_min']:.3f}–{r['keep_max']:.3f}",
            f"{r['kv_ratio']:.3f} / {r['kv_gated_ratio']:.3f}", ratio(p512, p512), ratio(p2048, p2048), decode,
        ])  # fmt: skip
    lines += [harness.table(headers, cells), "", "Held-out keep-rate per gated layer after training:", ""]
    lines.append(
        harness.table(
            ["capacity", *map(str, r0["gated_layers"])],
            [[str(r["capacity"]), *(f"{v:.3f}" for v in r["keep"].values())] for r in rows],
        )
    )
    if sp:
        lines += [
            "",
            "Speed: × = dense time / model time (> 1 is faster), batch 1; prefill medians (s) at 512 tokens: "
            + ", ".join(f"{k} {v:.3f}" for k, v in p512.items())
            + "; at 2048: "
            + ", ".join(f"{k} {v:.3f}" for k, v in p2048.items())
            + "; decode tok/s (64-token prompt, 16 new): "
            + ", ".join(f"{k} {v:.1f}" for k, v in dec.items())
            + ". The speed models use the training-free routers fitted to each capacity (speed depends on "
            "the keep-rate, not on training); mean keep-rate on the 512-token prompt: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in sp["keep_on_prompt"].items())
            + ".",
        ]
    layers_file = out.with_name(out.stem + "_layers.json")
    if layers_file.exists():
        lc = harness.read_json(layers_file)
        caps_l = list(next(iter(lc["ppl_ratio"].values())))
        sens = {int(i): v for i, v in lc["sensitivity"].items()}
        lines += [
            "",
            "## Which layers to gate (training-free)",
            "",
            "`python benchmarks/mod_threshold.py layers` (`condify.methods.mod_threshold.layer_sensitivity`): "
            "each layer gated alone at capacity 0.5 with the training-free router init, mean per-token KL to "
            "dense on the calibration text (nats):",
            "",
            harness.table(["layer", *map(str, sens)], [["KL", *(f"{v:.3f}" for v in sens.values())]]),
            "",
            "Held-out perplexity ratio of whole layer sets, training-free (router init + bias fit only):",
            "",
            harness.table(
                ["gated layers", *(f"capacity {c}" for c in caps_l)],
                [[f"{name}: {', '.join(map(str, layers))}", *(f"x{lc['ppl_ratio'][name][c]:.2f}" for c in caps_l)]
                 for name, layers in lc["sets"].items()],
            ),
        ]  # fmt: skip
    lines += ["", f"![keep-rates and perplexity]({png.name})", "", NOTES]
    harness.write_markdown(out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
