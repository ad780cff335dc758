"""dynamic-k quality with the full ``calibrate`` recipe, including the routed fine-tune (``adapt_steps``).

For each expert size and executed fraction: convert SmolLM2 (co-activation experts), train the routers,
fit per-layer thresholds to the target, then fine-tune every weight but the routers under the model's
own routing (KL to dense). Held-out perplexity ratio vs dense and executed expert compute are measured
before and after the fine-tune, on the same held-out text. One json per (size, fraction), so runs can
be split across processes; ``--render`` writes the markdown.

    .venv/bin/python benchmarks/dynamic_k_adapt.py --sizes 32 --fractions 0.75,0.5,0.3
    .venv/bin/python benchmarks/dynamic_k_adapt.py --render
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import harness

import condify
from condify.batches import as_batches
from condify.data import eval_batches, load_model, train_batches
from condify.evaluate import perplexity
from condify.methods.dynamic_k.calibrate import measure

PREFIX = "dynamic_k_adapt"
QUICK = dict(sizes="128", fractions="0.5", adapt_steps=1, router_steps=2, seq_len=32, eval_seqs=1)


def run(size: int, frac: float, args: argparse.Namespace) -> dict:
    """One row: routers + thresholds at ``frac`` executed, then the routed fine-tune; ratios to dense."""
    model, tok = load_model(args.model)
    held = as_batches(eval_batches(tok, "test", args.eval_seqs, 256, 8))
    ppl_dense = perplexity(model, held, progress=False)
    fit = as_batches(train_batches(tok, max(args.adapt_steps, 8) + 1, 2, args.seq_len))
    t = time.time()
    condify.modify(model, "dynamic-k", expert_size=size, clustering="coactivation")
    opts = {
        "router_steps": args.router_steps,
        "router_tokens": 4096,
        "target_sparsity": 1 - frac,
        "progress": False,
        "holdout": 1,
    }
    res = condify.calibrate(model, fit, **opts, adapt_steps=0)
    routers = measure(model, held)
    t_routers = time.time() - t
    res2 = condify.calibrate(
        model,
        fit,
        cluster=False,
        router_steps=0,
        adapt_steps=args.adapt_steps,
        adapt_lr=args.lr,
        holdout=1,
        progress=False,
    )
    adapted = measure(model, held)
    return {
        "size": size, "target_executed": frac, "ppl_dense": ppl_dense,
        "routers": [routers["ppl"] / ppl_dense, routers["executed"]],
        "adapted": [adapted["ppl"] / ppl_dense, adapted["executed"]],
        "router_r2": res.get("router_r2"), "adapt_loss": res2.get("adapt_loss"),
        "routers_min": t_routers / 60, "adapt_min": (time.time() - t - t_routers) / 60,
        "tokens": args.adapt_steps * 2 * args.seq_len, "args": vars(args),
    }  # fmt: skip


def render(out: Path) -> None:
    """Write ``out/dynamic_k_adapt.md`` from every row JSON in ``out``, keeping its hand-written findings."""
    rows = [harness.read_json(p) for p in sorted(out.glob(f"{PREFIX}_s*.json"))]
    rows.sort(key=lambda r: (r["size"], -r["target_executed"], r["tokens"]))
    if not rows:
        raise SystemExit(f"no {PREFIX}_s*.json in {out}")
    a = rows[0]["args"]
    headers = ["expert size", "target executed", "fine-tune tokens", "trained routers", "+ routed fine-tune",
               "router R^2", "minutes (routers / fine-tune)"]  # fmt: skip
    cells = [
        [r["size"], str(r["target_executed"]), r["tokens"], f"{r['routers'][0]:.3g} @ {r['routers'][1]:.2f}",
         f"**{r['adapted'][0]:.3g} @ {r['adapted'][1]:.2f}**", f"{r['router_r2']:.2f}",
         f"{r['routers_min']:.1f} / {r['adapt_min']:.1f}"]
        for r in rows
    ]  # fmt: skip
    lines = [
        "# dynamic-k on SmolLM2-135M: routed fine-tune (`calibrate(adapt_steps=...)`)",
        "",
        f"Held-out: {a['eval_seqs']} x 256 tokens of the test plays (dense ppl {rows[0]['ppl_dense']:.2f}). "
        "Recipe per row: `modify(expert_size=S, clustering='coactivation')`, "
        f"`calibrate(router_steps={a.get('router_steps', 300)}, "
        "router_tokens=4096, target_sparsity=1-f)`, then `calibrate(adapt_steps=N, adapt_lr=3e-4)` on N "
        f"batches of 2 x {a['seq_len']} train tokens, KL to dense, every weight but the routers trained, "
        "SiLU kept, routers and thresholds fixed. Cells: `ppl ratio @ executed expert compute`, both on the "
        "held-out text. 1 torch thread, 2-core Intel Xeon; minutes are wall time with the other core busy.",
        "",
        f"Command: `.venv/bin/python benchmarks/{PREFIX}.py --sizes S --fractions f --adapt-steps N` "
        f"(one `{PREFIX}_sS_ff[_nN].json` per row), then `--render`.",
        "",
        harness.table(headers, cells),
    ]
    md = out / f"{PREFIX}.md"
    old = md.read_text() if md.exists() else ""
    notes = old[old.index("## Findings") :] if "## Findings" in old else ""  # hand-written, kept
    harness.write_markdown(md, [*lines, *(["", notes.rstrip("\n")] if notes else [])])
    print("\n".join(lines))


def main() -> None:
    ap = harness.parser(
        __doc__, threads=1, out=harness.RESULTS, out_help="results folder", render="only write the markdown"
    )
    ap.add_argument("--sizes", default="32,128")
    ap.add_argument("--fractions", default="0.75,0.5,0.3")
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--router-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-seqs", type=int, default=16)
    args = harness.parse(ap, QUICK)
    if args.render is not None:
        render(args.out)
        return
    harness.setup(args)
    for s in (int(v) for v in args.sizes.split(",")):
        for f in (float(v) for v in args.fractions.split(",")):
            r = run(s, f, args)
            print(json.dumps(r, default=str), flush=True)
            tag = "" if args.adapt_steps == 100 else f"_n{args.adapt_steps}"
            harness.write_json(args.out / f"{PREFIX}_s{s}_f{f}{tag}.json", r)
            gc.collect()  # patched forwards make reference cycles: free this run's model and teacher now


if __name__ == "__main__":
    main()
