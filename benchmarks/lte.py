"""lte (Learn To be Efficient) on the embedded SmolLM2-135M: quality vs executed FFN compute, and speed.

For each target executed fraction: ``modify(model, "lte", expert_size=32)``, then one
``calibrate(target_sparsity=1-f, soft_steps=S, hard_steps=H)`` on ``max(S, H)`` batches of
2 x ``seq_len`` train tokens (so each stage makes at most one pass), with the held-out text (test plays,
never calibrated on) passed as ``holdout``. Reported: held-out perplexity ratio vs dense and executed
expert compute after stage 1 (soft router training + threshold fit, hard selection) and after stage 2
(routed fine-tune), the tokens trained on, and batch-1 CPU decode / prefill speed vs dense
(``condify.evaluate.compare_speed``, same process, interleaved). One json per target; ``--render``
writes ``benchmarks/results/lte.md`` and ``lte_frontier.png``.

    .venv/bin/python benchmarks/lte.py --fractions 0.75,0.5,0.35
    .venv/bin/python benchmarks/lte.py --render
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

import condify
from condify.batches import as_batches
from condify.data import eval_batches, load_model, train_batches
from condify.evaluate import compare_speed, set_threads
from condify.training import frozen_teacher

RESULTS = Path(__file__).parent / "results"
PREFIX = "lte"
# dynamic-k with its routed fine-tune on the same model and held-out text (benchmarks/results/dynamic_k_adapt.md):
# (executed, ratio, fine-tune tokens)
DYNAMIC_K = [(0.76, 1.04, 25600), (0.499, 1.20, 25600), (0.506, 1.08, 128000)]


def run(frac: float, args: argparse.Namespace) -> dict:
    model, tok = load_model()
    held = as_batches(eval_batches(tok, "test", args.eval_seqs, 256, 8))
    fit = as_batches(train_batches(tok, max(args.soft_steps, args.hard_steps), 2, args.seq_len))
    t = time.time()
    condify.modify(model, "lte", expert_size=args.expert_size)
    res = condify.calibrate(
        model, fit, holdout=held, target_sparsity=round(1 - frac, 6), soft_steps=args.soft_steps,
        hard_steps=args.hard_steps, hold_target=args.hold_target, progress=False,
    )  # fmt: skip
    minutes = (time.time() - t) / 60
    row = {
        "target_executed": frac, "dense_ppl": res["dense_ppl"],
        "soft": [res["ppl_after_soft"] / res["dense_ppl"], res["executed_after_soft"]],
        "hard": [res["ratio"], res["executed"]],
        "soft_tokens": args.soft_steps * 2 * args.seq_len, "hard_tokens": args.hard_steps * 2 * args.seq_len,
        "tokens": res["tokens"], "minutes": minutes, "threshold": res.get("threshold"), "eta": res.get("eta"),
        "router_init_r2": res.get("router_init_r2"), "hard_executed": res.get("hard_executed"), "executed_per_layer": res["executed_per_layer"],
        "soft_loss": res.get("soft_loss"), "hard_loss": res.get("hard_loss"), "args": vars(args),
    }  # fmt: skip
    if args.speed:
        dense = frozen_teacher(model)
        prompt = held[0]["input_ids"][:1, : args.prompt_len]
        sp = compare_speed(
            {"dense": dense, "lte": model}, prompt, new_tokens=args.new_tokens, repeats=args.repeats
        )
        row["decode_speedup"] = sp["lte"]["decode_speedup"]
        row["prefill_speedup"] = sp["lte"]["prefill_speedup"]
        row["decode_tok_s"] = [sp["dense"]["decode_tok_s"], sp["lte"]["decode_tok_s"]]
    return row


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    soft = sorted({(r["soft"][1], r["soft"][0]) for r in rows})
    ax.plot([p[0] for p in soft], [p[1] for p in soft], "o--", label="lte, stage 1 (routers)")
    for hold, style in ((False, "o-"), (True, "^-")):
        rs = sorted(
            (r for r in rows if r["args"].get("hold_target", False) == hold), key=lambda r: r["hard"][1]
        )
        if rs:
            label = "lte, stage 1 + 2" + (" (hold_target)" if hold else " (threshold fixed)")
            ax.plot([r["hard"][1] for r in rs], [r["hard"][0] for r in rs], style, label=label)
        for r in rs:
            ax.annotate(f"{r['tokens'] / 1000:.1f}k tok", (r["hard"][1], r["hard"][0]), fontsize=7)
    dk = [p for p in DYNAMIC_K if p[2] == 25600]
    ax.plot([p[0] for p in dk], [p[1] for p in dk], "s:", label="dynamic-k + routed fine-tune (25.6k tok)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("executed FFN fraction (held-out)")
    ax.set_ylabel("held-out perplexity / dense")
    ax.set_yscale("log")
    ax.set_title("lte on SmolLM2-135M")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def render(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob(f"{PREFIX}_f*.json"))]
    rows.sort(key=lambda r: (r["args"].get("hold_target", False), -r["target_executed"]))
    if not rows:
        raise SystemExit(f"no {PREFIX}_f*.json in {out}")
    a = rows[0]["args"]
    png = out / f"{PREFIX}_frontier.png"
    plot(rows, png)
    lines = [
        "# lte on SmolLM2-135M: held-out perplexity vs executed FFN compute",
        "",
        f"Held-out: {a['eval_seqs']} x 256 tokens of the test plays (dense ppl {rows[0]['dense_ppl']:.2f}), never "
        f"calibrated on. Per row: `modify(model, 'lte', expert_size={a['expert_size']})`, then one "
        f"`calibrate(target_sparsity=1-f, soft_steps={a['soft_steps']}, hard_steps={a['hard_steps']})` on "
        f"{max(a['soft_steps'], a['hard_steps'])} batches of 2 x {a['seq_len']} train tokens (defaults otherwise: router "
        "warm start by ridge regression on 2048 tokens, soft stage with the eta controller, one threshold "
        "fitted on 2048 tokens, routed fine-tune of every weight but the routers, KL to dense, lr 3e-4). "
        "Cells: `ppl ratio @ executed expert compute`, both measured on the held-out text, hard selection "
        f"`s >= tau`. Speed: batch 1, {a['prompt_len']}-token prompt, {a['new_tokens']} new tokens, median of "
        f"{a['repeats']}, vs the dense model in the same process; {a['threads']} torch thread(s) on a shared "
        "2-core machine (load average 1-11 during the runs: speed numbers are noisy).",
        "",
        f"Command: `.venv/bin/python benchmarks/{PREFIX}.py --fractions {a['fractions']} --soft-steps "
        f"{a['soft_steps']} --hard-steps {a['hard_steps']}` (rows with hold_target: add `--hold-target --no-speed`; "
        "one json per row), then `--render`.",
        "",
        "| target executed | hold_target | after stage 1 (routers) | after stage 2 (+ fine-tune) | tokens (soft + hard) | decode speed-up (b=1) | prefill speed-up | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = (
            (f"{r['decode_speedup']:.2f}x", f"{r['prefill_speedup']:.2f}x")
            if "decode_speedup" in r
            else ("-", "-")
        )
        lines.append(
            f"| {r['target_executed']} | {r['args'].get('hold_target', False)} | {r['soft'][0]:.3g} @ {r['soft'][1]:.3f} | **{r['hard'][0]:.3g} @ "
            f"{r['hard'][1]:.3f}** | {r['soft_tokens']} + {r['hard_tokens']} = {r['tokens']} | {sp[0]} | {sp[1]} | "
            f"{r['minutes']:.1f} |"
        )
    lines += [
        "",
        "dynamic-k reference (`dynamic_k_adapt.md`, same model and held-out text, 25.6k fine-tune tokens + 4096 "
        "router tokens): x1.04 @ 0.76, x1.20 @ 0.499.",
        "",
        f"![executed FFN fraction vs held-out perplexity ratio]({png.name})",
    ]
    md = out / f"{PREFIX}.md"
    old = md.read_text() if md.exists() else ""
    notes = old[old.index("## Findings") :] if "## Findings" in old else ""  # hand-written, kept
    md.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", default="0.75,0.5,0.35")
    ap.add_argument("--expert-size", type=int, default=32)
    ap.add_argument("--soft-steps", type=int, default=24)
    ap.add_argument("--hard-steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hold-target", action="store_true", help="calibrate(hold_target=True)")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
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
    for f in (float(v) for v in args.fractions.split(",")):
        r = run(f, args)
        print(json.dumps(r), flush=True)
        (out / f"{PREFIX}_f{f}{'_hold' if args.hold_target else ''}.json").write_text(json.dumps(r, indent=1))
        gc.collect()  # patched forwards make reference cycles: free this run's model and teacher now


if __name__ == "__main__":
    main()
