"""condify.frontier: the baseline against a hand-written oracle, and one whole sweep on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from small import ids, logits, one_thread, small  # noqa: F401  (one_thread: autouse fixture)

from condify import frontier
from condify.cli import main


def test_magnitude_topk_keeps_the_largest_inputs_of_every_projection_and_is_dense_at_one():
    model = small(layers=2)
    x = ids()
    dense = logits(model, x)
    with frontier.magnitude_topk(model, 1.0):
        assert torch.equal(logits(model, x), dense)
    seen: list[torch.Tensor] = []
    mlp = model.model.layers[0].mlp
    with frontier.magnitude_topk(model, 0.25):
        handle = mlp.down_proj.register_forward_pre_hook(
            lambda _, a: seen.append(a[0])
        )  # after the baseline's
        out = logits(model, x)
    handle.remove()
    h = seen[0]
    assert ((h != 0).sum(-1) == 16).all()  # 25 % of 64 neurons per token

    # oracle: the layer-0 MLP by hand, top-k of |input| of each projection
    def topk(v: torch.Tensor, k: int) -> torch.Tensor:
        i = v.abs().topk(k, dim=-1).indices
        return torch.zeros_like(v).scatter(-1, i, v.gather(-1, i))

    xin = torch.randn(3, 32)
    with frontier.magnitude_topk(model, 0.25), torch.no_grad():
        got = mlp(xin)
    xs = topk(xin, 8)
    with torch.no_grad():
        h = mlp.act_fn(xs @ mlp.gate_proj.weight.T) * (xs @ mlp.up_proj.weight.T)
        want = topk(h, 16) @ mlp.down_proj.weight.T
    torch.testing.assert_close(got, want)
    assert not torch.equal(out, dense)
    assert torch.equal(logits(model, x), dense)  # hooks removed
    with pytest.raises(ValueError, match="fraction"), frontier.magnitude_topk(model, 0.0):
        pass


def test_sweep_on_a_tiny_model_has_every_method_the_baseline_and_the_composed_point(tmp_path):
    model = small(layers=6, inter=64)
    train = [ids(1, 48, seed=s) for s in range(8)]
    held = [ids(1, 48, seed=100 + s) for s in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = {
        "dynamic-k": (0.5,),
        "lte": (0.5,),
        "mod-threshold": (0.5,),
        "layer-parallel": (1,),
        "mot": (4,),
    }
    res = frontier.sweep(model, train, held, values=values, speed=False)
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items()
    )  # the dense model is untouched
    methods = [p["method"] for p in res["points"]]
    assert methods == [
        *frontier.SWEEPS,
        "magnitude top-k (baseline)",
        "magnitude top-k (baseline)",
        "composed",
    ]
    for p in res["points"]:
        assert math.isfinite(p["ratio"]) and p["ratio"] > 0
        assert 0 < p["executed_flops"] < 2  # routers can cost more than they save on a 32-wide model
    dk = res["points"][0]
    assert dk["executed"] == pytest.approx(0.5, abs=0.2)  # of the MLP (its routers cost more at width 32)
    for p in res["points"][: len(frontier.SWEEPS)]:  # calibrate's own result is kept with each method point
        assert p["calibrate_result"]["ratio"] == p["calibrate_ratio"] and "tokens" in p["calibrate_result"]
    path = frontier.plot(res["points"], tmp_path / "f.png", "tiny")
    assert path.stat().st_size > 1000
    rows = frontier.table(res["points"])
    assert len(rows) == 2 + len(res["points"]) and "x" in rows[2]


def test_frontier_cli_rejects_an_unknown_method_before_loading_anything(capsys):
    with pytest.raises(SystemExit):
        main(["frontier", "--methods", "dynamic-k,nope", "--quick"])
    assert "no frontier sweep for 'nope'" in capsys.readouterr().err


def test_frontier_run_refuses_an_unknown_text_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="unknown text 'nope'"):
        frontier.run(tmp_path / "out", text="nope")
    assert not (tmp_path / "out").exists()


def test_frontier_plot_has_a_speed_panel_only_when_speed_was_measured(tmp_path):
    """A run with ``--no-speed`` gets one panel (ratio vs FLOPs), not an empty speed axis beside it."""
    import struct

    pts = [{"method": "m", "ratio": r, "executed_flops": f} for r, f in ((1.1, 0.9), (1.3, 0.8))]

    def width(points: list[dict]) -> int:
        path = frontier.plot(points, tmp_path / f"p{len(points[0])}.png", "t")
        return struct.unpack(">I", path.read_bytes()[16:20])[0]  # PNG IHDR width

    with_speed = [{**p, "decode_speedup": 1.0 + i / 10} for i, p in enumerate(pts)]
    assert width(pts) < 0.75 * width(with_speed)
