"""mot (Mixture of Tokens) benchmarks: (a) converting the embedded SmolLM2, (b) from scratch vs dense.

    python benchmarks/mot.py --out benchmarks/results            # the run in results/mot.md
    python benchmarks/mot.py --quick --out /tmp/mot              # a smoke run (~2 minutes)

(a) Embedded SmolLM2-135M: held-out (test plays) perplexity of dense, of the MoT conversion right
    after ``modify``, after MoT training, after the transition to the token-choice MoE, and of the dense
    model fine-tuned on the same tokens with the same loop (LM loss, same parameters: the MLPs of the
    converted layers), with training throughput (tokens/s) of each measured in this run.
(b) From scratch (the paper's setting, tiny): a 4-layer llama (d=128, vocabulary cut to the most frequent
    tokens of the training plays) trained on the corpus, dense (I=512) vs MoT (G=4, 16 experts of 128
    neurons: the same FFN FLOPs per token as dense, 4x the FFN parameters) and a dense model with the
    MoT's parameter count (I=2048, 4x the FFN FLOPs) for reference; eval loss vs step and vs wall time,
    then a 10 % transition of the MoT model to a top-4 token-choice MoE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import condify
from condify import batches as batches_mod
from condify import data, evaluate, training
from condify.methods.mot.calibrate import param_groups

# ---------------------------------------------------------------------------------------------------------
# (a) the embedded model
# ---------------------------------------------------------------------------------------------------------


def _timed_train(model, groups, batches, steps, lr):
    times: list[float] = []
    t0 = [time.perf_counter()]

    def after(step, loss):
        now = time.perf_counter()
        times.append(now - t0[0])
        t0[0] = now

    losses = training.train(
        model,
        groups,
        batches_mod.as_batches(batches),
        steps,
        training.distill_loss(None),
        lr=lr,
        after_step=after,
        progress=False,
    )
    return losses, times


def _tps(times: list[float], tokens_per_step: int) -> float:
    """Tokens/s over the steps after the first (warm-up)."""
    t = times[1:] if len(times) > 1 else times
    return tokens_per_step * len(t) / sum(t)


def embedded(args) -> dict:
    model, tok = data.load_model()
    test = data.eval_batches(
        tok, "test", num_sequences=args.eval_sequences, seq_len=args.eval_len, batch_size=4
    )
    n = args.steps + args.transition_steps
    train = data.train_batches(tok, n, batch_size=args.batch_size, seq_len=args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    out: dict = {"sizes": {"train_batch": args.batch_size, "seq_len": args.seq_len, "mot_steps": args.steps,
                           "transition_steps": args.transition_steps, "lr": args.lr,
                           "eval_tokens": args.eval_sequences * args.eval_len}}  # fmt: skip
    ppl = {}
    ppl["dense"] = evaluate.perplexity(model, test, progress=False)
    print("dense", ppl["dense"], flush=True)
    mods = dict(group_size=args.group_size, num_experts=args.experts, temperature=args.temperature)
    condify.modify(model, "mot", **mods)
    out["config"] = condify.applied_configs(model)[0].to_dict()
    ppl["mot_init"] = evaluate.perplexity(model, test, progress=False)
    print("mot init", ppl["mot_init"], flush=True)

    # MoT training then transition, through condify.calibrate; step times from the toolkit loop
    common = dict(loss="lm", lr=args.lr, params="mlp", progress=False, holdout=0)
    t = time.perf_counter()
    r1 = condify.calibrate(model, train[: args.steps], stage="mot", steps=args.steps,
                           temperature_end=args.temperature_end, **common)  # fmt: skip
    mot_seconds = time.perf_counter() - t
    ppl["mot_trained"] = evaluate.perplexity(model, test, progress=False)
    print("mot trained", ppl["mot_trained"], flush=True)
    t = time.perf_counter()
    r2 = condify.calibrate(
        model, train[args.steps :], stage="transition", steps=args.transition_steps, **common
    )
    moe_seconds = time.perf_counter() - t
    with condify.track(model) as tr:
        ppl["transitioned"] = evaluate.perplexity(model, test, progress=False)
    ppl["transitioned_batch1"] = evaluate.perplexity(model, [b[i : i + 1] for b in test[:1] for i in range(b.shape[0])],
                                                     progress=False)  # fmt: skip
    print("transitioned", ppl["transitioned"], flush=True)
    out["executed_mlp_fraction_transitioned"] = tr.fraction("mot", "mlp")
    mot_losses, moe_losses = r1["losses"], r2["transition_losses"]
    out["temperature_end"] = r1["temperature"]

    # the dense baseline, same loop, same parameters (the MLPs of the same layers), same tokens
    condify.unmodify(model)
    del model
    dense, _ = data.load_model()
    layers = condify.applied_configs(condify.modify(dense, "mot", **mods))[0].layers
    condify.unmodify(dense)
    groups = [p for i in layers for p in dense.model.layers[i].mlp.parameters()]
    # time 3 steps of MoT-stage training under the same loop for the throughput ratio (fresh conversion)
    d_losses, d_times = _timed_train(dense, groups, train, n, args.lr)
    ppl["dense_finetuned"] = evaluate.perplexity(dense, test, progress=False)
    print("dense finetuned", ppl["dense_finetuned"], flush=True)
    condify.modify(dense, "mot", **mods)
    _, m_times = _timed_train(dense, param_groups(dense, "mlp", args.lr, 1e-3), train, 4, args.lr)
    tps = {"dense": _tps(d_times, tokens_per_step), "mot": _tps(m_times, tokens_per_step),
           "mot_calibrate_call": args.steps * tokens_per_step / mot_seconds,
           "transition_calibrate_call": args.transition_steps * tokens_per_step / moe_seconds}  # fmt: skip
    out.update(ppl=ppl, train_tokens_per_s=tps, losses={"mot": mot_losses, "transition": moe_losses,
                                                         "dense": d_losses})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# (b) from scratch
# ---------------------------------------------------------------------------------------------------------


def _remap(tok, vocab: int):
    train_ids = data.tokens(tok, "train")
    val_ids = data.tokens(tok, "validation")
    counts = torch.bincount(train_ids, minlength=len(tok))
    keep = counts.argsort(descending=True)[: vocab - 1]
    table = torch.full((counts.numel(),), vocab - 1, dtype=torch.long)  # the rest: one "unknown" id
    table[keep] = torch.arange(vocab - 1)
    return table[train_ids], table[val_ids]


def _windows(ids: torch.Tensor, n: int, b: int, t: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - t - 1, (n, b), generator=g)
    return [torch.stack([ids[s : s + t] for s in row.tolist()]) for row in starts]


def _tiny(vocab: int, inter: int, d: int, layers: int, seq: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
                      tie_word_embeddings=True)  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg)


@torch.no_grad()
def _eval_loss(model, batches) -> float:
    model.eval()
    tot = sum(training.lm_loss(model(b, use_cache=False).logits, {"input_ids": b}).item() for b in batches)
    model.train()
    return tot / len(batches)


def _run(model, train, val, steps, lr, every, label):
    """AdamW + cosine (warm-up 5 %), eval loss every ``every`` steps; (steps, wall, train, eval) curves."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, training.cosine(steps, max(1, steps // 20)))
    model.train()
    curve = {"step": [], "wall": [], "eval": [], "train": []}
    wall = 0.0
    for step in range(steps):
        b = train[step % len(train)]
        t = time.perf_counter()
        loss = training.lm_loss(model(b, use_cache=False).logits, {"input_ids": b})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        wall += time.perf_counter() - t
        curve["train"].append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            curve["step"].append(step + 1)
            curve["wall"].append(wall)
            curve["eval"].append(_eval_loss(model, val))
            print(f"{label} step {step + 1} eval {curve['eval'][-1]:.3f} wall {wall:.0f}s", flush=True)
    return curve


def ffn_flops(d: int, inter: int, glu: bool = True) -> float:
    """Multiply-adds x2 per token of a dense (GLU) FFN."""
    return 2 * d * inter * (3 if glu else 2)


def mot_flops(d: int, inter: int, experts: int, group: int) -> dict[str, float]:
    s = inter // experts
    experts_ = experts * 2 * d * s * 3 / group  # E expert evaluations per group of G tokens
    controller = 2 * d * experts  # logits
    mixing = 2 * 2 * d * experts  # mixed inputs + redistributed outputs
    return {"experts": experts_, "controller": controller, "mixing": mixing,
            "total": experts_ + controller + mixing}  # fmt: skip


def scratch(args) -> dict:
    _, tok = data.load_model()
    train_ids, val_ids = _remap(tok, args.vocab)
    b, t = args.scratch_batch, args.scratch_seq
    train = _windows(train_ids, args.scratch_steps, b, t, seed=0)
    val = _windows(val_ids, args.scratch_eval_batches, b, t, seed=1)
    d, inter, G, E = 128, args.scratch_inter, 4, 16
    every = max(1, args.scratch_steps // 8)
    curves, params = {}, {}
    for label, width in [("dense", inter), ("mot", inter * G), ("dense_wide", inter * G)]:
        if label == "dense_wide" and not args.wide:
            continue
        model = _tiny(args.vocab, width, d, args.scratch_layers, t)
        if label == "mot":
            condify.modify(model, "mot", group_size=G, num_experts=E, layers=list(range(args.scratch_layers)),
                           clustering="none")  # fmt: skip
        params[label] = sum(p.numel() for p in model.parameters())
        curves[label] = _run(model, train, val, args.scratch_steps, args.scratch_lr, every, label)
        if label == "mot":
            # transition: 10 % more steps as a top-k = E / G token-choice MoE, then eval at batch 1
            from condify.methods.mot.transform import set_stage

            set_stage(model, condify.applied_configs(model)[0], "moe")
            before = _eval_loss(model, val)
            extra = max(1, args.scratch_steps // 10)
            c = _run(model, train, val, extra, args.scratch_lr * 0.3, extra, "transition")
            batch1 = _eval_loss(model, [v[i : i + 1] for v in val for i in range(v.shape[0])])
            curves["transition"] = {**c, "before": before, "batch1": batch1}
    flops = {"dense": ffn_flops(d, inter), "mot": mot_flops(d, inter * G, E, G),
             "dense_wide": ffn_flops(d, inter * G)}  # fmt: skip
    return {"sizes": {"d": d, "layers": args.scratch_layers, "vocab": args.vocab, "dense_inter": inter,
                      "group_size": G, "experts": E, "expert_size": inter * G // E, "batch": b, "seq_len": t,
                      "steps": args.scratch_steps, "lr": args.scratch_lr},
            "params": params, "ffn_flops_per_token": flops, "curves": curves}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    if "embedded" in res:
        L = res["embedded"]["losses"]
        n = len(L["mot"])
        ax[0].plot(range(1, len(L["dense"]) + 1), L["dense"], label="dense fine-tune")
        ax[0].plot(range(1, n + 1), L["mot"], label="MoT")
        ax[0].plot(
            range(n + 1, n + len(L["transition"]) + 1), L["transition"], "o-", label="transition (MoE)"
        )
        ax[0].set(title="(a) SmolLM2-135M: train LM loss", xlabel="step", ylabel="loss")
        ax[0].legend()
    if "scratch" in res:
        C = res["scratch"]["curves"]
        for k in ("dense", "mot", "dense_wide"):
            if k in C:
                ax[1].plot(C[k]["step"], C[k]["eval"], marker="o", label=k)
                ax[2].plot(C[k]["wall"], C[k]["eval"], marker="o", label=k)
        ax[1].set(title="(b) from scratch: eval loss vs step", xlabel="step", ylabel="eval loss")
        ax[2].set(
            title="(b) from scratch: eval loss vs training wall time", xlabel="seconds", ylabel="eval loss"
        )
        ax[1].legend()
        ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _f(x: float) -> str:
    return f"{x:.4g}"


def write_md(res: dict, path: Path, command: str) -> None:
    L = [
        "# mot (Mixture of Tokens): results",
        "",
        f"Command: `{command}` (machine: 2 shared CPU cores, {res['threads']} torch threads, torch {res['torch']}; "
        f"other jobs were running, load average ~8-10, so absolute speeds are low and noisy; ratios are from "
        f"the same process). Total wall time {res['total_seconds'] / 60:.1f} min (budget 30 min). "
        "Raw numbers: `mot.json`; plot: `mot.png`.",
        "",
    ]
    if "embedded" in res:
        e = res["embedded"]
        p, z, t = e["ppl"], e["sizes"], e["train_tokens_per_s"]
        d = p["dense"]
        cfg = e["config"]
        tok = z["train_batch"] * z["seq_len"]
        L += [
            "## (a) Converting the embedded SmolLM2-135M",
            "",
            f"`modify(method='mot', group_size={cfg['group_size']}, num_experts={cfg['num_experts']}, "
            f"temperature={cfg['temperature']})` on layers {cfg['layers'][0]}-{cfg['layers'][-1]} (the default "
            f"second half), top_k={cfg['top_k']} after the transition (executed MLP fraction "
            f"{e['executed_mlp_fraction_transitioned']:.3f} in the converted layers, tracked). Training: LM loss, "
            f"AdamW lr {z.get('lr', 3e-4)}, the MLPs (+controllers) of the converted layers, "
            f"batches of {z['train_batch']}x{z['seq_len']} tokens: {z['mot_steps']} MoT steps (temperature annealed "
            f"to {list(e['temperature_end'].values())[0]:.3g}) + {z['transition_steps']} transition step(s) "
            f"({(z['mot_steps'] + z['transition_steps']) * tok} tokens); the dense baseline trains the same "
            f"parameters on the same {(z['mot_steps'] + z['transition_steps']) * tok} tokens with the same loop. "
            f"Held-out: {z['eval_tokens']} tokens of the test plays.",
            "",
            "| model | held-out perplexity | x dense |",
            "|---|---|---|",
            f"| dense | {_f(d)} | 1 |",
            f"| dense, fine-tuned on the same tokens | {_f(p['dense_finetuned'])} | x{p['dense_finetuned'] / d:.3g} |",
            f"| MoT right after modify | {_f(p['mot_init'])} | x{p['mot_init'] / d:.3g} |",
            f"| MoT after {z['mot_steps']} steps | {_f(p['mot_trained'])} | x{p['mot_trained'] / d:.3g} |",
            f"| transitioned MoE (+{z['transition_steps']} step) | {_f(p['transitioned'])} | x{p['transitioned'] / d:.3g} |",
            f"| same model, one sequence at a time, first eval batch only (a different token subset: not comparable to the row above) | {_f(p['transitioned_batch1'])} | - |",
            "",
            "Training throughput, tokens/s (same loop, steps after the first; the machine was shared, so these are "
            "noisy):",
            "",
            "| | tokens/s | x dense |",
            "|---|---|---|",
            f"| dense (MLPs of the same layers trained) | {t['dense']:.3g} | 1 |",
            f"| MoT stage | {t['mot']:.3g} | x{t['mot'] / t['dense']:.3g} |",
            f"| `calibrate(stage='mot')` call (incl. snapshot) | {t['mot_calibrate_call']:.3g} | x{t['mot_calibrate_call'] / t['dense']:.3g} |",
            f"| `calibrate(stage='transition')` call (incl. snapshot, conversion) | {t['transition_calibrate_call']:.3g} | x{t['transition_calibrate_call'] / t['dense']:.3g} |",
            "",
        ]
    if "scratch" in res:
        sc = res["scratch"]
        z, C, fl, pr = sc["sizes"], sc["curves"], sc["ffn_flops_per_token"], sc["params"]
        L += [
            "## (b) From scratch: MoT vs dense at matched FLOPs per token",
            "",
            f"Llama, d={z['d']}, {z['layers']} layers, 4 heads, vocabulary = the {z['vocab'] - 1} most frequent "
            f"SmolLM2 tokens of the training plays + one unknown id; batches of {z['batch']}x{z['seq_len']} random "
            f"windows of the training plays, {z['steps']} steps ({z['steps'] * z['batch'] * z['seq_len']} tokens), "
            f"AdamW lr {z['lr']} (cosine, 5 % warm-up, wd 0.1); eval loss on 4 fixed batches of the validation plays. "
            f"Dense: I={z['dense_inter']}. MoT: every FFN, G={z['group_size']}, {z['experts']} experts of "
            f"{z['expert_size']} neurons (I={z['expert_size'] * z['experts']}): FFN FLOPs/token "
            f"{fl['mot']['total'] / 1e3:.0f}k (experts {fl['mot']['experts'] / 1e3:.0f}k + controller/mixing "
            f"{(fl['mot']['controller'] + fl['mot']['mixing']) / 1e3:.0f}k) vs dense {fl['dense'] / 1e3:.0f}k; "
            f"parameters {pr['mot'] / 1e6:.2f}M vs {pr['dense'] / 1e6:.2f}M.",
            "",
            "| step | " + " | ".join(k for k in ("dense", "mot", "dense_wide") if k in C) + " |",
            "|---|" + "---|" * len([k for k in ("dense", "mot", "dense_wide") if k in C]),
        ]
        for i, st in enumerate(C["dense"]["step"]):
            L.append(
                f"| {st} | "
                + " | ".join(f"{C[k]['eval'][i]:.3f}" for k in ("dense", "mot", "dense_wide") if k in C)
                + " |"
            )
        L += [
            "",
            "| | final eval loss | training wall time (s) | s/step |",
            "|---|---|---|---|",
        ]
        for k in ("dense", "mot", "dense_wide"):
            if k in C:
                L.append(
                    f"| {k} | {C[k]['eval'][-1]:.3f} | {C[k]['wall'][-1]:.0f} | {C[k]['wall'][-1] / z['steps']:.2f} |"
                )
        if "transition" in C:
            tr = C["transition"]
            L += [
                "",
                f"Transition of the MoT model to a top-{z['experts'] // z['group_size']} token-choice MoE: eval loss "
                f"{C['mot']['eval'][-1]:.3f} (MoT) -> {tr['before']:.3f} right after the switch -> {tr['eval'][-1]:.3f} after "
                f"{tr['step'][-1]} more steps (lr x0.3); at batch 1: {tr['batch1']:.3f}.",
            ]
        L.append("")
    L += ["## Reading", "", res.get("reading", "(see the final report)"), ""]
    path.write_text("\n".join(L))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-embedded", action="store_true")
    p.add_argument("--skip-scratch", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    # (a)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--temperature-end", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--transition-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--eval-len", type=int, default=128)
    # (b)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--scratch-inter", type=int, default=512)
    p.add_argument("--scratch-layers", type=int, default=4)
    p.add_argument("--scratch-steps", type=int, default=240)
    p.add_argument("--scratch-batch", type=int, default=8)
    p.add_argument("--scratch-seq", type=int, default=128)
    p.add_argument("--scratch-lr", type=float, default=3e-3)
    p.add_argument("--scratch-eval-batches", type=int, default=4)
    p.add_argument("--no-wide", dest="wide", action="store_false")
    p.add_argument("--report-only", action="store_true", help="rewrite mot.md / mot.png from mot.json")
    p.add_argument("--reading", default="", help="a paragraph of interpretation for mot.md")
    args = p.parse_args()
    command = "python benchmarks/mot.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    if args.report_only:
        res = json.loads((out / "mot.json").read_text())
        if args.reading:
            res["reading"] = args.reading
            (out / "mot.json").write_text(json.dumps(res, indent=1))
        plot(res, out / "mot.png")
        write_md(res, out / "mot.md", res.get("command", command))
        return
    if args.quick:
        args.steps, args.transition_steps, args.eval_sequences, args.seq_len = 2, 1, 4, 32
        args.scratch_steps, args.scratch_eval_batches = 16, 1
    evaluate.set_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"threads": args.threads, "torch": torch.__version__, "command": command}
    start = time.perf_counter()
    if not args.skip_embedded:
        res["embedded"] = embedded(args)
        res["embedded_seconds"] = time.perf_counter() - start
    if not args.skip_scratch:
        t = time.perf_counter()
        res["scratch"] = scratch(args)
        res["scratch_seconds"] = time.perf_counter() - t
    res["total_seconds"] = time.perf_counter() - start
    (out / "mot.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "mot.png")
    write_md(res, out / "mot.md", command)
    print(json.dumps({k: v for k, v in res.items() if k != "scratch"}, indent=1)[:3000])
    if "scratch" in res:
        C = res["scratch"]["curves"]
        print({k: (C[k]["eval"][-1], C[k]["wall"][-1]) for k in C}, res["scratch"]["params"])
    assert all(math.isfinite(v) for v in res.get("embedded", {}).get("ppl", {}).values())


if __name__ == "__main__":
    main()
