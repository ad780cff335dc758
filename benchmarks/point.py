"""One point of a method on a frontier setting with extra ``calibrate`` options; prints one JSON line.

Same windows and judge as ``frontier.py`` (seed 0): ``modify(model, METHOD)`` then ``calibrate(model,
train, KNOB=VALUE, **options)`` (the method's budget knob, as the frontier sweeps it), judged on the test
split. The line is a frontier point (``frontier.py --merge`` takes a file of them) with ``options`` and
``calibrate_result`` (calibrate's own result, its scalars, lists and per-pass records) added.

    .venv/bin/python benchmarks/point.py dynamic-k gemma3 python-docs 12 256 8 0.5 '{"adapt_lr": 1e-4}'
"""

from __future__ import annotations

import dataclasses
import json
import sys

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
    model.eval()
    ctx = frontier.Context(
        model, train, held, dense, evaluate.executed_flops(model, held[0][:1]), speed=False
    )
    extra = json.loads(options)
    sweep = frontier.SWEEPS[method]
    sweep = dataclasses.replace(sweep, calibrate={**sweep.calibrate, **extra})
    seen: list[dict] = []
    calibrate = condify.calibrate

    def keep(*args: object, **kwargs: object) -> dict:  # calibrate's own result, kept for the line
        seen.append(calibrate(*args, **kwargs))
        return seen[-1]

    condify.calibrate = keep
    try:
        point = frontier.method_point(ctx, sweep, float(value) if "." in value else int(value))
    finally:
        condify.calibrate = calibrate
    scalars = {k: v for k, v in seen[-1].items() if not isinstance(v, dict) or k.endswith("passes")}
    print(
        "RESULT",
        json.dumps({**point, "options": extra, "calibrate_result": scalars}, default=str),
        flush=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:9])
