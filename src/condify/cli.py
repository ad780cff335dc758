"""The ``condify`` command.

    condify methods                                   list the methods
    condify run --method layer-parallel               main job: convert + calibrate + evaluate + report
    condify convert --method dynamic-k -o tau=0.1 --out ckpt/
    condify calibrate ckpt/ --out ckpt2/ [--budget cpu] [-c key=value ...]
    condify eval ckpt/                                perplexity and executed FLOPs vs its dense twin
    condify bench ckpt/                               decode/prefill speed and KV bytes vs dense

``-o key=value`` passes a modify option, ``-c key=value`` a calibrate option; values are parsed as
JSON when they can be (``-o layers=[3,5]``, ``-c distill=false``), else taken as strings.

User errors (bad options, paths, budgets, checkpoints, unsupported models) print one line
``condify: error: ...`` to stderr and exit with status 2; ``--debug`` shows the traceback instead.
Every option is validated (as ``condify.modify``/``calibrate`` would) before a model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class UsageError(SystemExit):
    """A user error in a ``condify`` command: exits with status 2; ``str()`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _user_errors() -> tuple[type[BaseException], ...]:
    import condify

    return (
        condify.ConfigError, condify.ModifyError, condify.CheckpointError, condify.UnsupportedModelError,
        condify.DataError,
    )  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0]:
            raise UsageError(f"condify: error: option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        if k in out:
            raise UsageError(f"condify: error: option {k!r} is given twice")
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
    p.add_argument(
        "--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
    r.add_argument(
        "--eval-sequences", type=_positive, default=16, help="held-out 512-token windows (default 16)"
    )
    r.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    r.add_argument("--out", default="out", help="report folder (default: out/)")

    f = sub.add_parser(
        "frontier", help="every method at its budgets with its defaults vs a baseline: md + plot"
    )
    f.add_argument("--model", default=None, help="hub id or local folder (default: embedded SmolLM2-135M)")
    f.add_argument(
        "--text",
        default="shakespeare",
        help="text: shakespeare (default) or python-docs (condify.data.TEXTS)",
    )
    f.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    f.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of a few minutes")
    f.add_argument("--batches", type=_positive, default=None, help="calibration windows (default 32)")
    f.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    f.add_argument("--out", default="out/frontier", help="output folder (default: out/frontier/)")

    c = sub.add_parser("convert", help="apply a method (structure only) and save the checkpoint")
    model_args(c)
    c.add_argument("--out", required=True, help="output folder")

    k = sub.add_parser("calibrate", help="calibrate a saved checkpoint on the training plays and save it")
    k.add_argument("checkpoint")
    k.add_argument("--out", required=True)
    k.add_argument("--budget", default="cpu", help="recipe whose calibrate options are the defaults")
    k.add_argument("-c", "--calibrate-option", action="append", metavar="KEY=VALUE")
    k.add_argument("--batches", type=_positive, default=32, help="training batches of 4x256 tokens")

    for name, text in (
        ("eval", "held-out perplexity and executed FLOPs vs the dense twin"),
        ("bench", "speed vs dense"),
    ):
        e = sub.add_parser(name, help=text)
        e.add_argument("checkpoint")
        e.add_argument("--eval-sequences", type=_positive, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except UsageError as e:
        if args.debug:
            raise
        print(_one_line(str(e)), file=sys.stderr)
        raise
    except _user_errors() as e:
        if args.debug:
            raise
        msg = _one_line(f"condify: error: {e}")
        print(msg, file=sys.stderr)
        raise UsageError(msg) from None


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _out_dir(path: str) -> str:
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"condify: error: --out {path!r} exists and is not a folder")
    return path


def _checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint's config.json, after checking the folder (CheckpointError otherwise)."""
    from condify import serialization

    return serialization._read_config(Path(path))


def _budget(method: str, budget: str) -> Any:
    from condify.convert import method_spec

    recipes = method_spec(method).recipes
    if budget not in recipes:
        raise UsageError(
            f"condify: error: {method!r} has no budget {budget!r}; choose from {sorted(recipes)}"
        )
    return recipes[budget]


def _check_calibrate_options(method: str, options: dict[str, Any]) -> None:
    from condify.convert import method_spec

    spec = method_spec(method)
    if spec.options is None:
        if options:
            raise UsageError(f"condify: error: {method!r} has no calibrate options; got {sorted(options)}")
        return
    spec.options.from_options(**options)


def _load(name: str | None) -> Any:
    from condify import data

    if name is not None:
        _load_check(name)
    try:
        return data.load_model(name)
    except OSError as e:
        raise UsageError(f"condify: error: cannot load model {name!r}: {_one_line(str(e))[:300]}") from None


def _load_check(name: str) -> None:
    """Refuse a ``--model`` that is neither the embedded model, a local folder with a config, nor a hub
    id transformers can resolve (offline: one in the local cache)."""
    from transformers import AutoConfig

    from condify import data

    if name.lower() == data.DEFAULT_MODEL:
        return
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"condify: error: cannot load model {name!r}: {_one_line(str(e))[:300]}") from None


def _main(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    import condify
    from condify import data, evaluate, pipeline

    if args.threads:
        evaluate.set_threads(args.threads)
    if args.command == "methods":
        for name, text in condify.list_methods().items():
            print(f"{name:16s} {text}")
        return 0
    if args.command == "run":
        from condify.convert import method_spec

        recipe = _budget(args.method, args.budget)
        method_spec(args.method).config_cls.from_options(**{**recipe.modify, **_kv(args.option)})
        _check_calibrate_options(args.method, {**recipe.calibrate, **_kv(args.calibrate_option)})
        _out_dir(args.out)
        if args.model is not None:
            _load_check(args.model)
        result = pipeline.run(
            args.method, model_name=args.model, budget=args.budget, out_dir=args.out,
            modify_options=_kv(args.option), calibrate_options=_kv(args.calibrate_option),
            eval_sequences=args.eval_sequences, speed=not args.no_speed, progress=progress,
        )  # fmt: skip
        pipeline.print_summary(result)
        return 0
    if args.command == "frontier":
        from condify import frontier

        methods = args.methods.split(",") if args.methods else None
        for m in methods or ():
            if m not in frontier.SWEEPS:
                raise UsageError(
                    f"condify: error: no frontier sweep for {m!r}; known: {', '.join(frontier.SWEEPS)}"
                )
        if args.model is not None:
            _load_check(args.model)
        sizes = dict(frontier.QUICK) if args.quick else {}
        if args.batches:
            sizes["batches"] = args.batches
        res = frontier.run(
            _out_dir(args.out), model_name=args.model, text=args.text, methods=methods, speed=not args.no_speed,
            command="condify frontier " + " ".join(sys.argv[1:]), **sizes,
            log=lambda p: print(f"{p['method']} {p['knob']}={p['value']}: x{p['ratio']:.3f}", flush=True),
        )  # fmt: skip
        print("\n".join(frontier.table(res["points"])))
        print("wrote", *res["files"])
        return 0
    if args.command == "convert":
        from condify.convert import method_spec

        method_spec(args.method).config_cls.from_options(**_kv(args.option))
        _out_dir(args.out)
        model, tok = _load(args.model)
        condify.modify(model, args.method, **_kv(args.option))
        condify.save_pretrained(model, args.out)
        tok.save_pretrained(args.out)
        print(condify.describe(model))
        return 0

    config = _checkpoint(args.checkpoint)
    if args.command == "calibrate":
        methods = (config.get("condify") or {}).get("methods") or []
        if not methods:
            raise UsageError(
                f"condify: error: {args.checkpoint} is not a condify checkpoint (no `condify` in config.json)"
            )
        method = methods[-1]["method"]
        opts = {**_budget(method, args.budget).calibrate, **_kv(args.calibrate_option)}
        _check_calibrate_options(method, opts)
        _out_dir(args.out)
    model = condify.from_pretrained(args.checkpoint)
    tok = _tokenizer(args.checkpoint)
    if args.command == "calibrate":
        cfg = condify.applied_configs(model)[-1]
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
