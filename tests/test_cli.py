"""The `condify` command end to end on a tiny model that uses the embedded tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from condify import cli, data


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = data.load_model()[1]
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_methods(capsys):
    assert cli.main(["methods"]) == 0
    assert "layer-parallel" in capsys.readouterr().out


def test_convert_then_eval(tiny_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = [
        "convert",
        "--model",
        str(tiny_dir),
        "--method",
        "layer-parallel",
        "-o",
        "pairs=1",
        "-o",
        "start=2",
    ]
    assert cli.main([*args, "--out", str(ckpt)]) == 0
    assert json.loads((ckpt / "config.json").read_text())["condify"]["methods"][0]["start"] == 2
    capsys.readouterr()
    assert cli.main(["--no-progress", "eval", str(ckpt), "--eval-sequences", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ratio"] > 0 and result["flops"]["total"] > 0 and "speed" not in result


def test_run_quick_writes_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "--no-progress",
        "run",
        "--model",
        str(tiny_dir),
        "--method",
        "layer-parallel",
        "--budget",
        "quick",
    ]
    assert cli.main([*argv, "--eval-sequences", "2", "--no-speed", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "perplexity" in text and "layer-parallel" in text
    assert "held-out perplexity" in capsys.readouterr().out


def test_bad_option_is_a_clear_error():
    with pytest.raises(SystemExit, match="key=value"):
        cli.main(["convert", "--method", "layer-parallel", "-o", "pairs", "--out", "x"])


def test_summary_names_every_flops_group(capsys):
    from condify.pipeline import print_summary

    dense = {"attention": 2e9, "mlp": 4e9, "lm_head": 1e9, "other": 0.0, "total": 7e9}
    fused = {"attention": 1.6e9, "mlp": 3.2e9, "lm_head": 1e9, "other": 1.2e9, "total": 7e9}  # a fused pair
    ev = {"dense_ppl": 10.0, "ppl": 11.0, "ratio": 1.1, "flops": fused, "flops_dense": dense}
    print_summary({"evaluation": ev, "report": "r.md"})
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("executed FLOPs"))
    assert line == (
        "executed FLOPs vs dense: x1.000 (attention x0.800, mlp x0.800, lm_head x1.000, other +1.20 GFLOPs)"
    )
