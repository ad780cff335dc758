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

import torch

import condify
from condify.data import eval_batches, load_model, train_batches
from condify.evaluate import perplexity, set_threads
from condify.methods.dynamic_k.calibrate import measure
from condify.training import as_batches

RESULTS = Path(__file__).parent / "results"
PREFIX = "dynamic_k_adapt"


def run(size: int, frac: float, args: argparse.Namespace) -> dict:
    model, tok = load_model()
    held = as_batches(eval_batches(tok, "test", args.eval_seqs, 256, 8))
    ppl_dense = perplexity(model, held, progress=False)
    fit = as_batches(train_batches(tok, max(args.adapt_steps, 8) + 1, 2, args.seq_len))
    t = time.time()
    condify.modify(model, "dynamic-k", expert_size=size, clustering="coactivation")
    opts = {"router_steps": 300, "router_tokens": 4096, "target_sparsity": 1 - frac, "progress": False}
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
    rows = [json.loads(p.read_text()) for p in sorted(out.glob(f"{PREFIX}_s*.json"))]
    rows.sort(key=lambda r: (r["size"], -r["target_executed"], r["tokens"]))
    if not rows:
        raise SystemExit(f"no {PREFIX}_s*.json in {out}")
    a = rows[0]["args"]
    lines = [
        "# dynamic-k on SmolLM2-135M: routed fine-tune (`calibrate(adapt_steps=...)`)",
        "",
        f"Held-out: {a['eval_seqs']} x 256 tokens of the test plays (dense ppl {rows[0]['ppl_dense']:.2f}). "
        "Recipe per row: `modify(expert_size=S, clustering='coactivation')`, `calibrate(router_steps=300, "
        "router_tokens=4096, target_sparsity=1-f)`, then `calibrate(adapt_steps=N, adapt_lr=3e-4)` on N "
        f"batches of 2 x {a['seq_len']} train tokens, KL to dense, every weight but the routers trained, "
        "SiLU kept, routers and thresholds fixed. Cells: `ppl ratio @ executed expert compute`, both on the "
        "held-out text. 1 torch thread, 2-core Intel Xeon; minutes are wall time with the other core busy.",
        "",
        f"Command: `.venv/bin/python benchmarks/{PREFIX}.py --sizes S --fractions f --adapt-steps N` "
        f"(one `{PREFIX}_sS_ff[_nN].json` per row), then `--render`.",
        "",
        "| expert size | target executed | fine-tune tokens | trained routers | + routed fine-tune | router R^2 | minutes (routers / fine-tune) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['target_executed']} | {r['tokens']} | {r['routers'][0]:.3g} @ {r['routers'][1]:.2f} | "
            f"**{r['adapted'][0]:.3g} @ {r['adapted'][1]:.2f}** | {r['router_r2']:.2f} | "
            f"{r['routers_min']:.1f} / {r['adapt_min']:.1f} |"
        )
    md = out / f"{PREFIX}.md"
    old = md.read_text() if md.exists() else ""
    notes = old[old.index("## Findings") :] if "## Findings" in old else ""  # hand-written, kept
    md.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,128")
    ap.add_argument("--fractions", default="0.75,0.5,0.3")
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        render(out)
        return
    set_threads(args.threads)
    torch.manual_seed(0)
    for s in (int(v) for v in args.sizes.split(",")):
        for f in (float(v) for v in args.fractions.split(",")):
            r = run(s, f, args)
            print(json.dumps(r), flush=True)
            tag = "" if args.adapt_steps == 100 else f"_n{args.adapt_steps}"
            (out / f"{PREFIX}_s{s}_f{f}{tag}.json").write_text(json.dumps(r, indent=1))
            gc.collect()  # patched forwards make reference cycles: free this run's model and teacher now


if __name__ == "__main__":
    main()
