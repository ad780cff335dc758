"""dynamic-k's routed fine-tune (stage 5) at several rates, warm-ups and rate scalings, on one setting.

Same windows as ``frontier.py`` (seed 0). Calibrates once without the stage (``adapt_steps=0``), then
runs each variant on a copy: one pass over calibrate's fit batches (``steps``), KL to the dense model,
mode ``"masked"``. Prints one JSON line per variant: the batch losses, calibrate's hold-out NLL and KL to
dense (what ``Run.keep_if_better`` would judge on) and the ratio on the test split.

    .venv/bin/python benchmarks/finetune_rates.py gemma3 python-docs 12 256 8 0.5 \
        '[{"label": "default"}, {"label": "as given", "lr_scale": "none", "warmup": 1}]'

A variant's keys: ``lr`` (3e-4), ``lr_scale`` (``"weights"``), ``warmup`` (None: ``train``'s default),
``params`` (``"all"``), ``freeze_embed`` (False), ``steps`` (one pass).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

import harness
import torch

import condify
from condify import evaluate
from condify.batches import as_batches, split_holdout, vocab_size
from condify.methods.dynamic_k.finetune import _trainable
from condify.methods.dynamic_k.modules import mode
from condify.run import Run
from condify.training import distill_loss, frozen_teacher, kl_loss


def main(name: str, text: str, batches: str, seq_len: str, evals: str, target: str, variants: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, train, test, dense = harness.frontier_windows(name, text, int(batches), int(seq_len), int(evals))
    condify.modify(model, "dynamic-k")
    t0 = time.time()
    condify.calibrate(model, train, target_sparsity=float(target), adapt_steps=0, progress=False)
    before = evaluate.perplexity(model, test, progress=False) / dense
    fit, hold = split_holdout(as_batches(train, "cpu", vocab_size(model)), None, vocab_size(model))
    teacher = frozen_teacher(model)

    @torch.no_grad()
    def held_kl(m: torch.nn.Module) -> float:
        kls = [kl_loss(m(**b, use_cache=False).logits, teacher(**b, use_cache=False).logits, b) for b in hold]
        return float(sum(kls) / len(kls))

    base = Run(model, fit, hold, progress=False)
    print("BEFORE", json.dumps({"test_ratio": before, "held_nll": base.held_nll(), "held_kl": held_kl(model),
                                "calibrate_seconds": time.time() - t0}), flush=True)  # fmt: skip
    for v in json.loads(variants):
        spec: dict[str, Any] = {"lr": 3e-4, "lr_scale": "weights", "warmup": None, "params": "all",
                                "freeze_embed": False, "steps": len(fit), **v}  # fmt: skip
        m = copy.deepcopy(model)
        run = Run(m, fit, hold, progress=False, lr_scale=spec["lr_scale"])
        params = _trainable(m, spec["params"])
        if spec["freeze_embed"]:
            emb = {
                id(p) for e in (m.get_input_embeddings(), m.get_output_embeddings()) for p in e.parameters()
            }
            params = [p for p in params if id(p) not in emb]
        with mode(m, "masked"):
            losses = run.train(
                params, spec["steps"], distill_loss(teacher), lr=spec["lr"], warmup=spec["warmup"]
            )
        m.eval()
        out = {**spec, "losses": [round(x, 3) for x in losses], "held_nll": run.held_nll(), "held_kl": held_kl(m),
               "test_ratio": evaluate.perplexity(m, test, progress=False) / dense}  # fmt: skip
        print("RESULT", json.dumps(out), flush=True)
        del m


if __name__ == "__main__":
    main(*sys.argv[1:8])
