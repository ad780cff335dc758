"""The quality-vs-compute frontier: every method at its budgets with its defaults, beside a baseline.

Each point is ``condify.modify(model, method)`` + ``condify.calibrate(model, batches, <knob>=v)`` with
nothing else, judged on held-out text (``condify.frontier``). One run writes
``<out>/frontier-<model>-<text>.{json,md,png}``; ``--defaults A.json B.json`` writes
``<out>/defaults.md`` from runs on two (model, text) settings. ``condify frontier`` is the same run.

    .venv/bin/python benchmarks/frontier.py                       # SmolLM2 + Shakespeare
    .venv/bin/python benchmarks/frontier.py --text <name>         # a condify.data text
    .venv/bin/python benchmarks/frontier.py --defaults results/frontier-*.json
    .venv/bin/python benchmarks/frontier.py --quick               # smoke: tiny budgets, minutes
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import harness

from condify import WARN_RATIO, frontier

TARGETS = {"gentle": 1.10, "strong": 1.25}


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, threads=2, out=harness.RESULTS, out_help="output folder")
    p.add_argument("--defaults", nargs="+", type=Path, help="frontier JSON runs: write defaults.md from them")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="runs on one setting (finished or partial JSONs; same model, text and sizes): one "
                   "report, each point from the first run that has it, the header from the first")  # fmt: skip
    p.add_argument(
        "--text",
        default="shakespeare",
        help="text: shakespeare (default) or python-docs (condify.data.TEXTS)",
    )
    p.add_argument("--methods", default=",".join(frontier.SWEEPS), help="comma-separated methods")
    p.add_argument("--batches", type=int, default=32, help="calibration windows (10 %% held out)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out windows of the test split")
    p.add_argument("--repeats", type=int, default=3, help="speed repeats (medians)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-composed", action="store_true")
    args = harness.parse(p, frontier.QUICK, argv)
    if args.defaults:
        return render(args.out, args.defaults)
    if args.merge:
        return merge(args.out, args.merge)
    harness.setup(args)
    t0 = time.time()

    def log(pt: dict) -> None:
        print(f"[{(time.time() - t0) / 60:5.1f} min] {pt['method']} {pt['knob']}={pt['value']}: "
              f"x{pt['ratio']:.3f}, executed {pt.get('executed')}", flush=True)  # fmt: skip

    res = frontier.run(
        args.out, model_name=args.model, text=args.text, methods=args.methods.split(","), batches=args.batches,
        seq_len=args.seq_len, eval_sequences=args.eval_sequences, repeats=args.repeats, speed=not args.no_speed,
        composed=not args.no_composed, seed=args.seed, log=log,
        command=f"python benchmarks/frontier.py {' '.join(sys.argv[1:])}".strip(),
    )  # fmt: skip
    print("wrote", *res["files"])


def merge(out: Path, runs: list[Path]) -> None:
    """One report from several runs on one setting: each point (method, knob value) from the first run
    that has it; the first run gives the header (machine, sizes)."""
    res = harness.read_json(runs[0])

    def key(p: dict) -> tuple:
        return p["method"], p["knob"], p["value"]

    have = {key(p) for p in res["points"]}
    extra, commands = [], [res["command"]]
    for path in runs[1:]:
        part = harness.read_json(path)
        if (part["model"], part["text"]) != (res["model"], res["text"]):
            raise SystemExit(
                f"{path}: {part['model']} on {part['text']}, not {res['model']} on {res['text']}"
            )
        new = [p for p in part["points"] if key(p) not in have]
        have |= {key(p) for p in new}
        extra += new
        commands.append(part.get("command", str(path)))
    order = {m: i for i, m in enumerate(frontier.SWEEPS)}

    def rank(p: dict) -> tuple[int, int]:  # sweep order, then each method's values gentle first
        values = frontier.SWEEPS[p["method"]].values if p["method"] in frontier.SWEEPS else ()
        return order.get(p["method"], len(order)), values.index(p["value"]) if p["value"] in values else 0

    res["points"] = sorted(res["points"] + extra, key=rank)
    res["command"] = " ; ".join(commands)
    stem = runs[0].name.removesuffix(".json")
    print("wrote", *frontier.report(res, out, stem))


def render(out: Path, runs: list[Path]) -> None:
    """``defaults.md``: each method's two budgets on every run, against the targets."""
    lines = [
        "# Defaults: `calibrate(model, data, <budget>)` and nothing else",
        "",
        "Targets (#13): held-out perplexity ratio <= x1.10 at the gentle budget, <= x1.25 at the strong one, on",
        "both settings; calibrate warns (`condify.QualityWarning`) above x1.5. Rows from `benchmarks/frontier.py`",
        "(one run per setting; see each `frontier-*.md` for the command, machine and the baseline).",
        "",
        "`calibrate`: the ratio on calibrate's own hold-out, with its upper bound (`ratio_high`) where the run",
        "recorded it; `warns`: whether that call raised `condify.QualityWarning` (ratio or bound above x1.5).",
        "",
        "| setting | method | budget | ratio | target | met | calibrate | warns | executed | tokens | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
            cal, high = pt["calibrate_ratio"], pt.get("calibrate_ratio_high")
            said = f"x{cal:.3f}" + (f" (<= x{high:.3f})" if high is not None else "")
            warns = "yes" if max(cal, high or 0.0) > WARN_RATIO else "no"
            lines.append(
                f"| {setting} | {pt['method']} | {pt['knob']}={pt['value']} | x{pt['ratio']:.3f} | x{target} "
                f"| {met} | {said} | {warns} | {ex} | {pt['tokens']} | {pt['minutes']:.1f} |"
            )
    harness.write_markdown(out / "defaults.md", lines)
    print(f"wrote {out / 'defaults.md'}")


if __name__ == "__main__":
    main()
