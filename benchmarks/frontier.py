"""The quality-vs-compute frontier: every method at its budgets with its defaults, beside a baseline.

Each point is ``condify.modify(model, method)`` + ``condify.calibrate(model, batches, <knob>=v)`` with
nothing else, judged on held-out text (``condify.frontier``). One run writes
``<out>/frontier-<model>-<text>.json``, ``.md`` and ``.png``; ``--defaults A.json B.json`` writes
``benchmarks/results/defaults.md`` from runs on two (model, text) settings.

    .venv/bin/python benchmarks/frontier.py                       # SmolLM2 + Shakespeare
    .venv/bin/python benchmarks/frontier.py --text <other> --no-speed
    .venv/bin/python benchmarks/frontier.py --defaults results/frontier-a.json results/frontier-b.json
    .venv/bin/python benchmarks/frontier.py --quick               # smoke: tiny budgets, ~10 min
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import harness
import torch

from condify import data, frontier

QUICK = {"batches": 6, "seq_len": 128, "eval_sequences": 4, "repeats": 1}
TARGETS = {"gentle": 1.10, "strong": 1.25}


def text_tokens(name: str, tokenizer, split: str) -> torch.Tensor:
    """1-D token ids of a named text's split ("train" or "test")."""
    if name == "shakespeare":
        return data.tokens(tokenizer, split)
    return data.text_tokens(name, tokenizer, split)


def windows(ids: torch.Tensor, n: int, seq_len: int, *, seed: int | None) -> list[torch.Tensor]:
    """``n`` (1, seq_len) windows: evenly spaced (``seed=None``) or at seeded random starts."""
    if n * seq_len > ids.numel():
        raise SystemExit(f"the text has {ids.numel()} tokens: too few for {n} x {seq_len}")
    if seed is None:
        starts = [i * (ids.numel() - seq_len) // max(n - 1, 1) for i in range(n)]
    else:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g).tolist()
    return [ids[s : s + seq_len][None] for s in starts]


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, threads=2, out=harness.RESULTS, out_help="output folder")
    p.add_argument("--defaults", nargs="+", type=Path, help="frontier JSON runs: write defaults.md from them")
    p.add_argument("--text", default="shakespeare", help="text: shakespeare or a condify.data text name")
    p.add_argument("--methods", default=",".join(frontier.SWEEPS), help="comma-separated methods")
    p.add_argument(
        "--batches", type=int, default=32, help="calibration batches of 1 x seq_len (10 %% held out)"
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out windows of the test split")
    p.add_argument("--repeats", type=int, default=3, help="speed repeats (medians)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-composed", action="store_true")
    args = harness.parse(p, QUICK, argv)
    if args.defaults:
        return render(args.out, args.defaults)
    model, tok = harness.start(args)
    model_name = args.model or "SmolLM2-135M-Instruct"
    train = windows(text_tokens(args.text, tok, "train"), args.batches, args.seq_len, seed=args.seed)
    held = windows(text_tokens(args.text, tok, "test"), args.eval_sequences, args.seq_len, seed=None)
    env = harness.environment()
    t0 = time.time()

    def log(pt: dict) -> None:
        print(f"[{(time.time() - t0) / 60:5.1f} min] {pt['method']} {pt['knob']}={pt['value']}: "
              f"x{pt['ratio']:.3f}, executed {pt.get('executed')}", flush=True)  # fmt: skip

    res = frontier.sweep(
        model, train, held, methods=args.methods.split(","), composed=not args.no_composed,
        speed=not args.no_speed, repeats=args.repeats, log=log,
    )  # fmt: skip
    res.update({"model": model_name, "text": args.text, "environment": env, "argv": sys.argv[1:]})
    stem = f"frontier-{model_name.split('-')[0].lower()}-{args.text}"
    harness.write_json(args.out / f"{stem}.json", res)
    title = f"{model_name} on {args.text}: defaults at each budget vs magnitude top-k"
    frontier.plot(res["points"], args.out / f"{stem}.png", title)
    lines = [
        f"# Frontier: {model_name} on {args.text}",
        "",
        f"`python benchmarks/frontier.py {' '.join(sys.argv[1:])}`; calibration {res['train']} (batches, "
        f"batch, tokens; calibrate holds out the last 10 %), judged on {res['held']} windows of the test split "
        f"(never calibrated on). Dense held-out perplexity {res['dense_ppl']:.3f}.",
        f"Machine: {env.get('cpu', '?')}, torch {env.get('torch', '?')}, {args.threads} threads, load average "
        f"{env['load_average']} at the start (shared machine: speed columns are indicative).",
        "",
        *frontier.table(res["points"]),
        "",
        f"![frontier]({stem}.png)",
    ]
    harness.write_markdown(args.out / f"{stem}.md", lines)
    print(f"wrote {args.out / stem}.md")


def render(out: Path, runs: list[Path]) -> None:
    """``defaults.md``: each method's two budgets on every run, against the targets."""
    lines = [
        "# Defaults: `calibrate(model, data, <budget>)` and nothing else",
        "",
        "Targets (#13): held-out perplexity ratio <= x1.10 at the gentle budget, <= x1.25 at the strong one, on",
        "both settings; calibrate warns (`condify.QualityWarning`) above x1.5. Rows from `benchmarks/frontier.py`.",
        "",
        "| setting | method | budget | ratio | target | met | executed | tokens | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in runs:
        res = harness.read_json(path)
        setting = f"{res['model']} + {res['text']}"
        seen: dict[str, int] = {}
        for pt in res["points"]:
            if pt["method"] not in frontier.SWEEPS:
                continue
            i = seen[pt["method"]] = seen.get(pt["method"], -1) + 1
            target = TARGETS["gentle" if i == 0 else "strong"]
            met = "yes" if pt["ratio"] <= target else "**no**"
            ex = "-" if pt.get("executed") is None else f"{pt['executed']:.1%}"
            lines.append(
                f"| {setting} | {pt['method']} | {pt['knob']}={pt['value']} | x{pt['ratio']:.3f} | x{target} "
                f"| {met} | {ex} | {pt['tokens']} | {pt['minutes']:.1f} |"
            )
    harness.write_markdown(out / "defaults.md", lines)
    print(f"wrote {out / 'defaults.md'}")


if __name__ == "__main__":
    main()
