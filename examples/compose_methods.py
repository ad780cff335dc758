"""Compose two methods on one model: layer-parallel pairs, then dynamic-k experts in every layer the pairs
do not own. Methods compose on disjoint layers; each is calibrated in turn (``method=`` names it), and
the result saves and loads as one checkpoint.

python examples/compose_methods.py --pairs 2 --target-sparsity 0.25
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import condify
from condify import data, evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2, help="pairs of adjacent layers run in parallel")
    p.add_argument(
        "--target-sparsity", type=float, default=0.25, help="fraction of MLP compute dynamic-k skips"
    )
    p.add_argument("--batches", type=int, default=8, help="calibration batches of 2 x seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=8)
    args = p.parse_args()

    model, tok = data.load_model()
    dense = copy.deepcopy(model)
    train = data.train_batches(tok, args.batches, 2, args.seq_len)

    # first method: its calibrate sweeps where the pairs cost least, then fine-tunes the paired layers
    condify.modify(model, "layer-parallel", pairs=args.pairs)
    condify.calibrate(
        model, train, method="layer-parallel", sweep_batches=1, finetune_steps=2, progress=False
    )
    paired = condify.applied_configs(model)[0].resolve(len(model.model.layers))

    # second method on the layers the first does not own (overlapping layers are refused)
    free = [i for i in range(len(model.model.layers)) if i not in paired]
    condify.modify(model, "dynamic-k", layers=free, expert_size=64)
    result = condify.calibrate(
        model, train, method="dynamic-k", target_sparsity=args.target_sparsity,
        router_steps=50, router_tokens=1024, adapt_steps=2, progress=False,
    )  # fmt: skip
    print(condify.describe(model).splitlines()[0])
    print(
        f"layer-parallel pairs: {paired}; dynamic-k on {len(free)} layers, executed {result['executed']:.3f}"
    )

    test = data.eval_batches(
        tok, "test", num_sequences=args.eval_sequences, seq_len=args.seq_len, batch_size=4
    )
    dense_ppl, ppl = (evaluate.perplexity(m, test, progress=False) for m in (dense, model))
    flops = evaluate.flops_ratio(model, dense, test[0])  # one batch of held-out windows
    print(f"perplexity: dense {dense_ppl:.2f} -> {ppl:.2f} (x{ppl / dense_ppl:.3f})")
    print(f"flops: {flops['total']:.3f} of dense in total, {flops['mlp']:.3f} in the MLPs")

    with tempfile.TemporaryDirectory() as d:  # one checkpoint holds both methods
        condify.save_pretrained(model, d)
        again = condify.from_pretrained(d)
        ids = test[0][:1]
        with torch.no_grad():
            same = torch.equal(again(ids).logits, model(ids).logits)
        print(f"reloaded: {[c.method for c in condify.applied_configs(again)]}, identical logits = {same}")


if __name__ == "__main__":
    main()
