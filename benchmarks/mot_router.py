"""mot's transition router: the MoT controller vs the ridge refit, right after the switch (no tuning).

    python benchmarks/mot_router.py smol shakespeare 16 512 16 12

Frontier windows (seed 0); the held-out ratio on the first 4 test windows, for the switch from the
modified model and from the model after calibrate's MoT pass, with each router.
"""

from __future__ import annotations

import copy
import math
import sys

import harness
import torch

import condify
from condify.batches import as_batches, first_tokens
from condify.methods.mot.calibrate import MoTCalibration, _config, fit_routers
from condify.methods.mot.transform import set_stage
from condify.training import mean_nll


def main(model_name: str, text: str, batches: str, seq_len: str, evals: str, top_k: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense, train, held, _ = harness.frontier_windows(model_name, text, int(batches), int(seq_len), int(evals))
    dense.eval()
    held = held[:4]
    dense_nll = mean_nll(dense, held)
    fit = first_tokens(as_batches(train), MoTCalibration().router_tokens)  # calibrate's default
    for start in ("modify", "after the MoT pass"):
        model = copy.deepcopy(dense)
        condify.modify(model, "mot", top_k=int(top_k))
        if start != "modify":
            condify.calibrate(model, train, stage="mot", progress=False)
        for router in ("controller", "regression"):
            m = copy.deepcopy(model)
            set_stage(m, _config(m), "moe")
            if router == "regression":
                fit_routers(m, fit)
            print(f"{start}, {router}: x{math.exp(mean_nll(m, held) - dense_nll):.3f}", flush=True)
            del m
        del model


if __name__ == "__main__":
    main(*sys.argv[1:7])
