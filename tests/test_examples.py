"""The examples as a user runs them: each script in ``examples/`` in a subprocess (offline, embedded SmolLM2,
tiny budgets through its arguments), ``train_accelerate.py`` on two processes (``torch.distributed.run``,
gloo), and ``examples/notebooks/quickstart.ipynb`` top to bottom with nbclient. Each is checked on what it
prints (numbers that must hold, reloaded checkpoints that must match)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
COVERED = {"quickstart.py", "convert_calibrate_evaluate.py", "finetune_lora.py", "compose_methods.py",
           "train_accelerate.py"}  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def _run(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _numbers(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text}"
    return [float(g) for g in m.groups()]


def test_every_example_script_is_run_here():
    assert {p.name for p in EXAMPLES.glob("*.py")} == COVERED


@pytest.mark.slow
def test_example_quickstart():
    out = _run("examples/quickstart.py", "--method", "layer-parallel")
    dense, converted = _numbers(r"perplexity: dense ([\d.]+) -> ([\d.]+)", out)
    assert math.isfinite(converted) and converted > 0 and dense > 0
    assert "identical logits = True" in out


@pytest.mark.slow
def test_example_convert_calibrate_evaluate():
    out = _run("examples/convert_calibrate_evaluate.py", "--method", "mod-threshold", "--eval-sequences", "2",
               "--seq-len", "128")  # fmt: skip
    dense, ppl, _ = _numbers(r"perplexity: dense ([\d.]+) -> ([\d.]+) \(x([\d.]+)\)", out)
    (executed,) = _numbers(r"executed: ([\d.]+)", out)
    (flops,) = _numbers(r"flops: ([\d.]+) of dense in total", out)
    assert dense > 0 and math.isfinite(ppl)
    assert 0.6 < executed < 0.9  # the quick recipe's capacity is 0.75
    assert flops < 1.0  # skipped tokens ran no matmuls


@pytest.mark.slow
def test_example_finetune_lora_with_trainer():
    out = _run("examples/finetune_lora.py", "--steps", "2", "--eval-sequences", "2", "--seq-len", "64")
    before, after = _numbers(r"perplexity: ([\d.]+) -> ([\d.]+) after 2 LoRA steps", out)
    assert math.isfinite(after) and after != before  # LoRA changed the merged model
    k0, k1, cap = _numbers(r"keep rate: ([\d.]+) -> ([\d.]+) \(capacity ([\d.]+)\)", out)
    assert abs(k1 - cap) < 0.15 and abs(k0 - cap) < 0.15
    assert "identical logits = True" in out


@pytest.mark.slow
def test_example_compose_methods():
    out = _run("examples/compose_methods.py", "--pairs", "1", "--batches", "4", "--eval-sequences", "4",
               "--seq-len", "64", "--target-sparsity", "0.5")  # fmt: skip
    assert "reloaded: ['layer-parallel', 'dynamic-k'], identical logits = True" in out
    (executed,) = _numbers(r"dynamic-k on \d+ layers, executed ([\d.]+)", out)
    assert 0.35 < executed < 0.7  # target_sparsity 0.5
    (flops,) = _numbers(r"flops: ([\d.]+) of dense in total", out)
    assert flops < 1.0


@pytest.mark.slow
def test_example_train_accelerate_on_two_processes(tmp_path):
    import condify
    from condify import data, evaluate

    out = _run("-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               "examples/train_accelerate.py", "--steps", "2", "--seq-len", "64", "--out", str(tmp_path / "ckpt"))  # fmt: skip
    assert "processes: 2" in out
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert losses and all(math.isfinite(v) for v in losses)
    (printed,) = _numbers(r"held-out perplexity ([\d.]+)", out)
    model = condify.from_pretrained(tmp_path / "ckpt").eval()  # what rank 0 saved is what was trained
    _, tok = data.load_model()
    test = data.eval_batches(tok, "test", num_sequences=4, seq_len=64, batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers ran one thread each
    try:
        assert evaluate.perplexity(model, test, progress=False) == pytest.approx(printed, abs=0.006)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_notebook_quickstart_runs_offline(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for k, v in _env(
        CONDIFY_NB_CAPACITIES="0.75", CONDIFY_NB_EVAL_SEQUENCES="2", CONDIFY_NB_SEQ_LEN="128"
    ).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook draws inline
    nb = nbformat.read(EXAMPLES / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(
        o.get("text", "") for o in outputs if o.output_type == "stream" and o.get("name") == "stdout"
    )
    (ratio,) = _numbers(r"capacity 0\.75: perplexity [\d.]+ \(x([\d.]+)\)", text)
    assert 1.0 < ratio < 5.0
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline plot"
    assert not [o for o in outputs if o.output_type == "error"]
