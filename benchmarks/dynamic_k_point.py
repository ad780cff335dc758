"""One dynamic-k point on a frontier setting with extra ``calibrate`` options; prints one JSON line.

Same windows as ``frontier.py`` (seed 0): ``modify(model, "dynamic-k")`` then
``calibrate(model, train, target_sparsity=T, **options)``, judged on the test split.

    .venv/bin/python benchmarks/dynamic_k_point.py gemma3 python-docs 12 256 8 0.5 '{"adapt_lr": 1e-4}'
"""

from __future__ import annotations

import json
import sys
import time

import harness
import torch

import condify
from condify import evaluate


def main(
    model_name: str, text: str, batches: str, seq_len: str, evals: str, target: str, options: str
) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, train, held, dense = harness.frontier_windows(
        model_name, text, int(batches), int(seq_len), int(evals)
    )
    t0 = time.time()
    condify.modify(model, "dynamic-k")
    cal = condify.calibrate(
        model, train, target_sparsity=float(target), progress=False, **json.loads(options)
    )
    ratio = evaluate.perplexity(model, held, progress=False) / dense
    scalars = {k: v for k, v in cal.items() if not isinstance(v, (dict, list))}
    out = {
        "test_ratio": ratio,
        "options": json.loads(options),
        "minutes": (time.time() - t0) / 60,
        "cal": scalars,
    }
    print("RESULT", json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:8])
