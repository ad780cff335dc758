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


def test_a_sharded_dcp_folder_is_refused_not_half_loaded(tmp_path):
    """A distributed (DCP) dump in place of the safetensors is not a condify checkpoint: a clear
    CheckpointError (a world-size mismatch never loads silently), not random weights."""
    from tiny import tiny

    model = tiny("llama")
    condify.modify(model, "dynamic-k", expert_size=8)
    condify.save_pretrained(model, tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "__0_0.distcp").write_bytes(b"\0" * 16)
    with pytest.raises(condify.CheckpointError, match="could not load"):
        condify.from_pretrained(tmp_path)
