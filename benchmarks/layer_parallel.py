"""layer-parallel on the embedded SmolLM2: quality (training-free and fine-tuned) and speed vs dense.

    python benchmarks/layer_parallel.py --pairs 2 4 6 8 --finetune-steps 40 --out benchmarks/results

For each pair count: sweep the start layer on calibration data, measure held-out perplexity
(training-free), fine-tune the paired layers (KL to dense), measure again. Then time every variant
against dense in one interleaved run (prefill 512 / 2048 tokens, decode at batch 1 and 8).
"""

from __future__ import annotations

import copy
import time

import harness
import torch

import condify
from condify import data, evaluate
from condify.report import Report

QUICK = dict(pairs=[2], finetune_steps=1, seq_len=32, eval_sequences=1, start_stride=8, repeats=1)


def main() -> None:
    p = harness.parser(__doc__, threads=2, out=harness.RESULTS, out_help="results folder")
    p.add_argument("--pairs", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--start-stride", type=int, default=2, help="sweep every k-th start layer")
    p.add_argument("--repeats", type=int, default=3)
    args = harness.parse(p, QUICK)
    dense, tok = harness.start(args)
    test = data.eval_batches(tok, "test", num_sequences=args.eval_sequences, seq_len=512, batch_size=4)
    train = data.train_batches(
        tok, max(args.finetune_steps, 2), batch_size=args.batch_size, seq_len=args.seq_len
    )
    sweep = data.train_batches(tok, 1, batch_size=4, seq_len=256, seed=1)
    ppl_dense = evaluate.perplexity(dense, test, progress=False)
    rows, models = [], {"dense": dense}
    n = dense.config.num_hidden_layers
    for pairs in args.pairs:
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        condify.modify(model, "layer-parallel", pairs=pairs)
        starts = list(range(1, n - 2 * pairs, args.start_stride))
        res = condify.calibrate(
            model,
            sweep,
            pairs=pairs,
            starts=starts,
            placement="contiguous",
            finetune_steps=0,
            holdout=0,
            progress=False,
        )
        ppl_free = evaluate.perplexity(model, test, progress=False)
        res_ft = condify.calibrate(
            model, sweep + train, pairs=pairs, starts=[res["start"]], sweep_batches=1, finetune_steps=args.finetune_steps, lr=1e-4,
            placement="contiguous", holdout=0, progress=False,
        )  # fmt: skip
        ppl_ft = evaluate.perplexity(model, test, progress=False)
        flops = evaluate.flops_ratio(model, dense, test[0][:1])
        models[f"{pairs} pairs"] = model
        rows.append(
            [pairs, f"{res['layers'][0]}-{res['layers'][-1]}", f"x{ppl_free / ppl_dense:.3f}", f"x{ppl_ft / ppl_dense:.3f}",
             res_ft.get("finetune_tokens", 0), f"{time.perf_counter() - t0:.0f}"]
        )  # fmt: skip
        print(rows[-1], flops, flush=True)

    speed = {}
    for name, ids, dec in (
        ("prefill 512 / decode b1", test[0][:1], test[0][:1, :64]),
        ("decode b8", test[0][:1], test[0][:, :64].repeat(2, 1)),
        ("prefill 2048", torch.cat([b.reshape(1, -1) for b in test[:1]], 1)[:, :2048], None),
    ):
        speed[name] = evaluate.compare_speed(models, ids, dec, new_tokens=16, repeats=args.repeats)
        print(
            name,
            {
                k: (round(v["prefill_speedup"], 3), round(v["decode_speedup"], 3))
                for k, v in speed[name].items()
            },
            flush=True,
        )

    rep = Report("layer-parallel on SmolLM2-135M (embedded)", harness.environment())
    rep.add_text(
        f"Held-out perplexity on {args.eval_sequences}x512 tokens of the test plays; dense = {ppl_dense:.3f}. "
        f"The start layer is chosen by a perplexity sweep (every {args.start_stride}th start, 4x256 training tokens); "
        f"the fine-tune trains the paired layers only, {args.finetune_steps} AdamW steps of "
        f"{args.batch_size}x{args.seq_len} tokens, KL to the dense model, lr 1e-4. "
        "Pairs are fused into one wide attention + one wide MLP per pair."
    )
    rep.add_text(
        harness.table(
            ["pairs", "layers", "ppl training-free", "ppl fine-tuned", "fine-tune tokens", "seconds"], rows
        )
    )
    srows = []
    for name in models:
        if name == "dense":
            continue
        s1, s8, s2k = (speed[k][name] for k in speed)
        srows.append([name, f"{s1['prefill_speedup']:.2f}x", f"{s2k['prefill_speedup']:.2f}x", f"{s1['decode_speedup']:.2f}x",
                      f"{s8['decode_speedup']:.2f}x", f"{s1['kv_ratio']:.2f}x"])  # fmt: skip
    rep.add_heading("Speed vs dense (same process, interleaved, median of repeats)")
    rep.add_text(
        harness.table(["variant", "prefill 512", "prefill 2048", "decode b1", "decode b8", "KV bytes"], srows)
    )
    pr = [int(r[0]) for r in rows]
    rep.plot_lines(
        "layer_parallel_ppl", pr,
        {"training-free": [float(r[2][1:]) for r in rows], "fine-tuned": [float(r[3][1:]) for r in rows]},
        xlabel="pairs", ylabel="perplexity / dense", title="layer-parallel: held-out perplexity ratio",
    )  # fmt: skip
    print(f"wrote {rep.write(args.out, 'layer_parallel.md')}")


if __name__ == "__main__":
    main()
