"""One point of a method on a frontier setting with extra ``calibrate`` options; prints one JSON line.

Same windows and judge as ``frontier.py`` (seed 0): ``modify(model, METHOD)`` then ``calibrate(model,
train, KNOB=VALUE, **options)`` (the method's budget knob, as the frontier sweeps it), judged on the test
split. The line is a frontier point (``frontier.py --merge`` takes a file of them, calibrate's own result
included) with ``options`` added.

    .venv/bin/python benchmarks/point.py dynamic-k gemma3 python-docs 12 256 8 0.5 '{"adapt_lr": 1e-4}'
"""

from __future__ import annotations

import dataclasses
import json
import sys

import harness
import torch

from condify import evaluate, frontier


def main(
    method: str, model_name: str, text: str, batches: str, seq_len: str, evals: str, value: str, options: str
) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, train, held, dense = harness.frontier_windows(
        model_name, text, int(batches), int(seq_len), int(evals)
    )
    model.eval()
    ctx = frontier.Context(
        model, train, held, dense, evaluate.executed_flops(model, held[0][:1]), speed=False
    )
    extra = json.loads(options)
    sweep = frontier.SWEEPS[method]
    sweep = dataclasses.replace(sweep, calibrate={**sweep.calibrate, **extra})
    point = frontier.method_point(ctx, sweep, float(value) if "." in value else int(value))
    print(
        "RESULT",
        json.dumps({**point, "options": extra}, default=str),
        flush=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:9])
