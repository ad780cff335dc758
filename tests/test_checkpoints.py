"""Checkpoints written by an earlier condify (``tests/data/make_checkpoints.py`` at commit 77b2835) still load
and give the logits they gave when they were saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import condify

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("method", ["layer-parallel", "mod-threshold", "dynamic-k"])
def test_old_checkpoint_loads_with_same_logits(method):
    folder = DATA / f"ckpt_{method.replace('-', '_')}"
    expected = load_file(str(folder / "expected.safetensors"))
    model = condify.from_pretrained(folder).eval()
    assert [c.method for c in condify.applied_configs(model)] == [method]
    with torch.no_grad():
        logits = model(expected["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
