"""dynamic-k with ``attention=True`` on the embedded SmolLM2-135M: what each stage costs in perplexity.

Every attention projection (q/k/v/o of all 30 layers) becomes a ``Linear -> ReLU -> Linear`` MLP with
``--width`` x the parameter-matched hidden width, initialised as the best rank-h/2 approximation of the
linear map, then distilled (MSE to the original projection's output, ``--steps`` Adam steps per
projection on ``--tokens`` calibration tokens), then MoE-fied: routers regress expert norms, and
per-projection thresholds run a fraction of the projection experts. The FFNs are converted too but
kept dense (tau = 0), so every row isolates the attention part. Held-out perplexity vs dense.

    .venv/bin/python benchmarks/dynamic_k_attention.py     # writes results/dynamic_k_attention.{md,json}
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import harness
import torch

import condify
from condify.batches import as_batches
from condify.data import eval_batches, train_batches
from condify.evaluate import perplexity
from condify.methods.dynamic_k import executed_fraction, mode, track_executed
from condify.methods.dynamic_k.calibrate import _collect_inputs, distill_projections, fit_tau, train_routers
from condify.methods.dynamic_k.modules import converted

QUICK = dict(width=[1.0], steps=1, tokens=512, router_steps=2, fractions=[0.5], eval_seqs=1, eval_len=64)


def hidden_widths(sites: list[tuple[str, torch.nn.Module]]) -> dict[str, int]:
    """{site name: hidden width} of converted projections. Reads condify internals."""
    return {harness.site_state(m).site: m.expert_mlp.up.out_features for _, m in sites}


def projection_data(model: torch.nn.Module, calib: list, tokens: int, sites: list) -> dict:
    """Router data (inputs, expert norms) of the converted projections only. Uses a private condify helper."""
    data = _collect_inputs(model, calib, tokens)
    return {p: data[p] for p, _ in sites}


def attention_ppl(model: torch.nn.Module, evals: list) -> tuple[float, float]:
    """(perplexity, executed fraction of the projection experts), FFN experts all running."""
    attn = [p for p, _ in converted(model, "attention")]
    with torch.no_grad(), track_executed(model) as stats:
        ppl = perplexity(model, evals, progress=False)
    return ppl, executed_fraction(stats, attn)


def main() -> None:
    ap = harness.parser(
        __doc__, threads=1, out=harness.RESULTS / "dynamic_k_attention", out_help="results path stem"
    )
    ap.add_argument("--width", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--expert-size", type=int, default=16, help="neurons per projection expert")
    ap.add_argument("--steps", type=int, default=1000, help="distillation steps per projection")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (distil and routers)")
    ap.add_argument("--router-steps", type=int, default=300)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=512)
    args = harness.parse(ap, QUICK)
    t0 = time.time()
    dense, tok = harness.start(args)
    evals = eval_batches(tok, "test", args.eval_seqs, args.eval_len, batch_size=4)
    calib = as_batches(train_batches(tok, max(1, args.tokens // 512), batch_size=2, seq_len=256))
    ppl_dense = perplexity(dense, evals, progress=False)
    rows = []
    for width in args.width:
        model = condify.modify(
            copy.deepcopy(dense), "dynamic-k", attention=True, attention_width=width,
            attention_expert_size=args.expert_size,
        )  # fmt: skip
        row: dict = {"width": width, "seconds": {}}
        sites = converted(model, "attention")
        row["hidden"] = hidden_widths(sites[:4])
        with torch.no_grad(), mode(model, "original"):
            assert abs(perplexity(model, evals, progress=False) / ppl_dense - 1) < 1e-4
        row["ppl_init"] = attention_ppl(model, evals)[0] / ppl_dense
        t = time.time()
        row.update(distill_projections(model, calib, args.steps, max_tokens=args.tokens, progress=False))
        row["seconds"]["distill"] = time.time() - t
        row["ppl_distilled"] = attention_ppl(model, evals)[0] / ppl_dense
        t = time.time()
        data = projection_data(model, calib, args.tokens, sites)  # the FFNs keep tau = 0
        row.update(train_routers(model, data, args.router_steps, batch_size=128, progress=False))
        row["seconds"]["routers"] = time.time() - t
        for f in args.fractions:
            fit_tau(model, data, 1 - f)
            ppl, ex = attention_ppl(model, evals)
            row[f"ppl@{f}"] = (ppl / ppl_dense, ex)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {
        "ppl_dense": ppl_dense, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
        "minutes": (time.time() - t0) / 60, "environment": harness.environment(),
    }  # fmt: skip
    harness.write_json(args.out.with_suffix(".json"), res)
    write(res, args.out.with_suffix(".md"))


def write(res: dict, path: Path) -> None:
    """Render ``res`` (as saved in ``dynamic_k_attention.json``) to the markdown file ``path``."""
    env = res["environment"]
    a = res["args"]
    fracs = [float(k.split("@")[1]) for k in res["rows"][0] if k.startswith("ppl@")]
    headers = ["width (x param-matched)", "hidden q/k/v/o", "rank-h/2 init", "distilled (rel. error before -> after)",
               *(f"routed, target {f}" for f in fracs)]  # fmt: skip
    rows = [
        [str(r["width"]), "/".join(str(v) for v in r["hidden"].values()), f"{r['ppl_init']:.3g}",
         f"{r['ppl_distilled']:.3g} ({r['attention_rel_error_before']:.3f} -> {r['attention_rel_error_after']:.3f})",
         *(f"{r[f'ppl@{f}'][0]:.3g} @ {r[f'ppl@{f}'][1]:.2f}" for f in fracs)]
        for r in res["rows"]
    ]  # fmt: skip
    lines = [
        "# dynamic-k `attention=True` on SmolLM2-135M, CPU",
        "",
        f"Machine: {env.get('cpu', '?')}, {a['threads']} thread(s), torch {env.get('torch', '?')}; "
        f"{res['minutes']:.1f} min. Command: `.venv/bin/python benchmarks/dynamic_k_attention.py` "
        f"(width {a['width']}, {a['steps']} distillation steps of 256 tokens per projection on "
        f"{a['tokens']} calibration tokens, {a['router_steps']} router steps, "
        f"{a['expert_size']}-neuron projection experts).",
        "",
        f"Held-out: {a['eval_seqs']} x {a['eval_len']} tokens of the test plays, dense perplexity "
        f"{res['ppl_dense']:.3f}. All 120 projections converted (q/k/v/o of 30 layers); the FFNs are kept "
        "dense (tau = 0), so every column is the cost of the attention part alone. Cells: perplexity "
        "ratio vs dense (and executed fraction of projection expert compute).",
        "",
        harness.table(headers, rows),
    ]
    harness.write_markdown(path, lines)


if __name__ == "__main__":
    main()
