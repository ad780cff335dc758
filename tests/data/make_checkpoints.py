"""Write one tiny checkpoint per method with the condify of the current commit (run from the repo root).

The files are committed; ``tests/test_checkpoints.py`` loads them with today's condify and checks the
logits saved beside them, so checkpoints written by earlier versions keep loading.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from tiny import tiny  # noqa: E402

import condify  # noqa: E402

HERE = Path(__file__).parent
IDS = torch.arange(2 * 12).reshape(2, 12) % 128
SETUPS = {
    "layer-parallel": dict(pairs=1, start=2),
    "mod-threshold": dict(capacity=0.5, layers=[1, 3]),
    "dynamic-k": dict(expert_size=16),
}


def make(method: str, options: dict) -> None:
    torch.manual_seed(0)
    model = tiny("llama")
    condify.modify(model, method, **options)
    with torch.no_grad():  # non-trivial new weights, so the check sees them
        for name, p in model.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_layout.tau"):
                b.fill_(0.4)
    out = HERE / f"ckpt_{method.replace('-', '_')}"
    condify.save_pretrained(model, out)
    with torch.no_grad():
        logits = model(IDS, use_cache=False).logits
    save_file({"input_ids": IDS, "logits": logits.contiguous()}, str(out / "expected.safetensors"))


if __name__ == "__main__":
    for m, o in SETUPS.items():
        make(m, o)
