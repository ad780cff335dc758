"""One point of a method on a frontier setting with extra ``calibrate`` options; prints one JSON line.

Same windows as ``frontier.py`` (seed 0): ``modify(model, METHOD)`` then ``calibrate(model, train,
KNOB=VALUE, **options)`` (the method's budget knob, as the frontier sweeps it), judged on the test split.

    .venv/bin/python benchmarks/point.py dynamic-k gemma3 python-docs 12 256 8 0.5 '{"adapt_lr": 1e-4}'
"""

from __future__ import annotations

import json
import sys
import time

import harness
import torch

import condify
from condify import evaluate, frontier


def main(
    method: str, model_name: str, text: str, batches: str, seq_len: str, evals: str, value: str, options: str
) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, train, held, dense = harness.frontier_windows(
        model_name, text, int(batches), int(seq_len), int(evals)
    )
    mod_opts, cal_opts = frontier.SWEEPS[method].calls(float(value) if "." in value else int(value))
    t0 = time.time()
    condify.modify(model, method, **mod_opts)
    cal = condify.calibrate(model, train, progress=False, **cal_opts, **json.loads(options))
    ratio = evaluate.perplexity(model, held, progress=False) / dense
    scalars = {k: v for k, v in cal.items() if not isinstance(v, (dict, list))}
    out = {
        "method": method,
        "value": value,
        "test_ratio": ratio,
        "options": json.loads(options),
        "minutes": (time.time() - t0) / 60,
        "cal": scalars,
    }
    print("RESULT", json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:9])
