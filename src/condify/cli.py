"""The ``condify`` command.

    condify methods                                   list the methods
    condify run --method layer-parallel               main job: convert + calibrate + evaluate + report
    condify convert --method dynamic-k -o tau=0.1 --out ckpt/
    condify calibrate ckpt/ --out ckpt2/ [--budget cpu] [-c key=value ...]
    condify eval ckpt/                                perplexity and executed FLOPs vs its dense twin
    condify bench ckpt/                               decode/prefill speed and KV bytes vs dense

``-o key=value`` passes a modify option, ``-c key=value`` a calibrate option; values are parsed as
JSON when they can be (``-o layers=[3,5]``, ``-c distill=false``), else taken as strings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"condify: option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="condify",
        description="Turn a dense Hugging Face causal LM into a conditional-compute model, calibrate it, "
        "and measure it against the dense model. Runs offline on the embedded SmolLM2-135M by default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the registered methods")

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model", default=None, help="hub id or local folder (default: embedded SmolLM2-135M)"
        )
        sp.add_argument("--method", required=True, help="method name (see `condify methods`)")
        sp.add_argument(
            "-o", "--option", action="append", metavar="KEY=VALUE", help="modify option (repeatable)"
        )

    r = sub.add_parser("run", help="convert + calibrate + evaluate vs dense + write a report (the main job)")
    model_args(r)
    r.add_argument("--budget", default="cpu", help="calibration recipe: quick | cpu | long (default: cpu)")
    r.add_argument("-c", "--calibrate-option", action="append", metavar="KEY=VALUE", help="calibrate option")
    r.add_argument("--eval-sequences", type=int, default=16, help="held-out 512-token windows (default 16)")
    r.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    r.add_argument("--out", default="out", help="report folder (default: out/)")

    c = sub.add_parser("convert", help="apply a method (structure only) and save the checkpoint")
    model_args(c)
    c.add_argument("--out", required=True, help="output folder")

    k = sub.add_parser("calibrate", help="calibrate a saved checkpoint on the training plays and save it")
    k.add_argument("checkpoint")
    k.add_argument("--out", required=True)
    k.add_argument("--budget", default="cpu", help="recipe whose calibrate options are the defaults")
    k.add_argument("-c", "--calibrate-option", action="append", metavar="KEY=VALUE")
    k.add_argument("--batches", type=int, default=32, help="training batches of 4x256 tokens")

    for name, text in (
        ("eval", "held-out perplexity and executed FLOPs vs the dense twin"),
        ("bench", "speed vs dense"),
    ):
        e = sub.add_parser(name, help=text)
        e.add_argument("checkpoint")
        e.add_argument("--eval-sequences", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    import condify
    from condify import data, evaluate, pipeline, registry

    if args.threads:
        evaluate.set_threads(args.threads)
    if args.command == "methods":
        for name, text in condify.list_methods().items():
            print(f"{name:16s} {text}")
        return 0
    if args.command == "run":
        result = pipeline.run(
            args.method, model_name=args.model, budget=args.budget, out_dir=args.out,
            modify_options=_kv(args.option), calibrate_options=_kv(args.calibrate_option),
            eval_sequences=args.eval_sequences, speed=not args.no_speed, progress=progress,
        )  # fmt: skip
        pipeline.print_summary(result)
        return 0
    if args.command == "convert":
        model, tok = data.load_model(args.model)
        condify.modify(model, args.method, **_kv(args.option))
        condify.save_pretrained(model, args.out)
        tok.save_pretrained(args.out)
        print(condify.describe(model))
        return 0

    model = condify.from_pretrained(args.checkpoint)
    tok = _tokenizer(args.checkpoint)
    if args.command == "calibrate":
        cfg = condify.applied_configs(model)[-1]
        recipes = registry.get(cfg.method).recipes
        if args.budget not in recipes:
            raise SystemExit(
                f"condify: {cfg.method!r} has no budget {args.budget!r}; choose from {sorted(recipes)}"
            )
        opts = {**recipes[args.budget].calibrate, **_kv(args.calibrate_option)}
        result = condify.calibrate(
            model, data.train_batches(tok, args.batches), method=cfg.method, progress=progress, **opts
        )
        condify.save_pretrained(model, args.out)
        tok.save_pretrained(args.out)
        print(json.dumps(result, indent=1, default=str))
        return 0
    dense = pipeline.dense_twin(model)
    ev = pipeline.evaluate_pair(
        model,
        dense,
        tok,
        eval_sequences=args.eval_sequences,
        speed=args.command == "bench",
        progress=progress,
    )
    if args.command == "eval":
        ev.pop("speed", None)
    print(json.dumps(ev, indent=1, default=str))
    return 0


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        from condify import data

        return data.load_model(None)[1]


if __name__ == "__main__":
    sys.exit(main())
