"""mod-threshold's keep-rate controller while the layers train: the capacity asked vs the keep-rate held.

Same windows as ``frontier.py`` (seed 0). ``modify(model, "mod-threshold")`` then ``calibrate(model,
train, capacity=CAPACITY, steps=STEPS)``; prints, per training step, the scheduled capacity and the mean
hard keep-rate of that step's training forward (``train_keep``), then the held-out keep-rate per layer
of the returned model (biases fitted to the target) and the test-split perplexity ratio.

    .venv/bin/python benchmarks/mod_threshold_lag.py gemma3 python-docs 12 256 8 0.5 22
"""

from __future__ import annotations

import sys

import harness
import torch

import condify
from condify import evaluate


def main(
    model_name: str, text: str, batches: str, seq_len: str, evals: str, capacity: str, steps: str
) -> None:
    torch.manual_seed(0)
    model, train, test, dense = harness.frontier_windows(
        model_name, text, int(batches), int(seq_len), int(evals)
    )
    condify.modify(model.eval(), "mod-threshold")
    res = condify.calibrate(model, train, capacity=float(capacity), steps=int(steps), progress=False)
    print("| step | capacity asked | kept by the training forward |\n|---|---|---|")
    for i, (asked, kept) in enumerate(res["train_keep"]):
        print(f"| {i + 1} | {asked:.3f} | {kept:.3f} |")
    held = {i: round(r, 3) for i, r in res["keep_rates_holdout"].items()}
    ratio = evaluate.perplexity(model, test, progress=False) / dense
    print(
        f"returned model: held-out keep-rates {held}; test-split ratio x{ratio:.3f}; passes {res['passes']}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:8])
