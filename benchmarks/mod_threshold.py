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

import torch

import condify
from condify import data, evaluate
from condify.methods.mod_threshold import keep_rates

OUT = Path(__file__).parent / "results"


def _ppl(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    return evaluate.perplexity(model, batches, progress=False)


def _kv(model: torch.nn.Module, ids: torch.Tensor, gated: list[int] | None = None) -> tuple[int, int]:
    """(all layers, gated layers only) KV bytes after a prefill of ``ids``."""
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    total = evaluate.kv_cache_bytes(cache)
    idx = gated or []
    part = 0
    for i in idx:
        layer = cache.layers[i]
        part += layer.nbytes() if hasattr(layer, "nbytes") else layer.keys.nbytes + layer.values.nbytes
    return total, part


def _prefill_times(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median prefill seconds per model, interleaved (rotating order), one warm-up round."""
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    with torch.inference_mode():
        for r in range(repeats + 1):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                models[n](input_ids=ids, use_cache=True, logits_to_keep=1)
                if r:
                    times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--router-steps", type=int, default=12)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT / "mod_threshold.md")
    args = p.parse_args()

    torch.manual_seed(0)
    evaluate.set_threads(args.threads)
    env = evaluate.environment()
    dense, tok = data.load_model()
    test = data.eval_batches(tok, "test", args.eval_sequences, args.eval_len, batch_size=4)
    n_batches = max(args.router_steps, args.steps, 1)
    train = data.train_batches(tok, n_batches, batch_size=args.batch, seq_len=args.seq_len)
    test_ids = torch.cat(test)
    ids512 = test_ids.flatten()[:512][None]
    ids2048 = (
        test_ids.flatten()[:2048][None]
        if test_ids.numel() >= 2048
        else torch.cat(test * 2).flatten()[:2048][None]
    )
    t0 = time.time()
    dense_ppl = _ppl(dense, test)
    dense_kv, _ = _kv(dense, ids512)
    print(f"dense ppl {dense_ppl:.3f}, kv {dense_kv}", flush=True)
    rows, models, rates = [], {"dense": dense}, {}
    for c in args.capacities:
        model = copy.deepcopy(dense)
        condify.modify(model, method="mod-threshold", capacity=c)
        gated = condify.applied_configs(model)[0].resolve(len(model.model.layers))
        r1 = condify.calibrate(
            model, train, capacity=c, train="routers", steps=args.router_steps, progress=False
        )
        ppl_router = _ppl(model, test)
        r2 = condify.calibrate(model, train, capacity=c, train="all", steps=args.steps, progress=False)
        ppl_full = _ppl(model, test)
        held = keep_rates(model, test)
        kv, kv_gated = _kv(model, ids512, gated)
        dense_gated = dense_kv * len(gated) / dense.config.num_hidden_layers
        rates[c] = held
        rows.append(
            {
                "capacity": c,
                "ppl_router": ppl_router / dense_ppl,
                "ppl_full": ppl_full / dense_ppl,
                "tokens_router": r1["tokens"],
                "tokens_full": r1["tokens"] + r2["tokens"],
                "keep_min": min(held.values()),
                "keep_max": max(held.values()),
                "kv_ratio": kv / dense_kv,
                "kv_gated_ratio": kv_gated / dense_gated,
                "losses_router": r1["losses"],
                "losses_full": r2["losses"],
            }
        )
        models[f"c={c}"] = model
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("losses")}), flush=True)
        partial = {"rows": rows, "rates": {str(k): v for k, v in rates.items()}, "dense_ppl": dense_ppl}
        args.out.with_suffix(".json").write_text(json.dumps(partial, indent=1))
    quality_s = time.time() - t0

    t0 = time.time()
    p512 = _prefill_times(models, ids512, args.repeats)
    p2048 = _prefill_times(models, ids2048, max(1, args.repeats - 1))
    decode_ids = ids512[:, :64]
    dec = {
        n: evaluate.time_decode(m, decode_ids, new_tokens=24, repeats=args.repeats) for n, m in models.items()
    }
    speed_s = time.time() - t0
    for row in rows:
        n = f"c={row['capacity']}"
        row["prefill512"] = p512["dense"] / p512[n]
        row["prefill2048"] = p2048["dense"] / p2048[n]
        row["decode"] = dec[n] / dec["dense"]
    _write(args, env, rows, rates, dense_ppl, p512, p2048, dec, quality_s, speed_s)


def _write(args, env, rows, rates, dense_ppl, p512, p2048, dec, quality_s, speed_s) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for c, r in rates.items():
        ax[0].plot(list(r), list(r.values()), "o-", label=f"target {c}")
        ax[0].axhline(c, color="gray", lw=0.5, ls=":")
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

    tokens = f"{args.batch}×{args.seq_len}"
    lines = [
        "# mod-threshold on SmolLM2-135M (embedded), CPU",
        "",
        f"Machine: {env.get('device', env)}; {args.threads} threads, **shared with other processes during this "
        "session** (load average 8–12 on 2 cores), so timings are noisy; ratios are interleaved in one process.",
        "",
        f"Command: `.venv/bin/python benchmarks/mod_threshold.py --router-steps {args.router_steps} --steps "
        f"{args.steps} --batch {args.batch} --seq-len {args.seq_len} --eval-sequences {args.eval_sequences} "
        f"--eval-len {args.eval_len} --repeats {args.repeats}`",
        "",
        f"Gated layers: 1, 3, ..., 27 (14 of 30). Held-out: {args.eval_sequences} × {args.eval_len} tokens of the "
        f"test plays; dense perplexity {dense_ppl:.2f}. Calibration text: train plays, batches of {tokens} tokens. "
        "Router-only = routers trained with the model frozen (KL to dense); full = then all decoder layers and "
        "routers trained together (KL to dense), capacity walked 1.0 → target over half the steps, router biases "
        "fitted to the target on the calibration text at the end. Keep-rates measured on the held-out text "
        "(hard threshold).",
        "",
        "| capacity | ppl ×, router-only | ppl ×, + training | tokens (router / total) | keep-rate held-out "
        "(min–max) | KV bytes × (all / gated layers) | prefill 512 × | prefill 2048 × | decode × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['capacity']} | {r['ppl_router']:.2f} | {r['ppl_full']:.2f} | {r['tokens_router']:,} / "
            f"{r['tokens_full']:,} | {r['keep_min']:.3f}–{r['keep_max']:.3f} | {r['kv_ratio']:.3f} / "
            f"{r['kv_gated_ratio']:.3f} | {r['prefill512']:.2f} | {r['prefill2048']:.2f} | {r['decode']:.2f} |"
        )
    lines += [
        "",
        "Speed (× = dense time / model time, > 1 is faster): prefill medians (s) 512: "
        + ", ".join(f"{k} {v:.3f}" for k, v in p512.items())
        + "; 2048: "
        + ", ".join(f"{k} {v:.3f}" for k, v in p2048.items())
        + "; decode tok/s (batch 1, 64-token prompt, 24 new): "
        + ", ".join(f"{k} {v:.1f}" for k, v in dec.items())
        + f". Wall time: quality {quality_s / 60:.1f} min, speed {speed_s / 60:.1f} min.",
        "",
        f"![keep-rates and perplexity]({png.name})",
        "",
    ]
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(
        json.dumps({"rows": rows, "rates": {str(k): v for k, v in rates.items()}}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
