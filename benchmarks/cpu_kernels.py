"""CPU decode speed of the compiled sparse-FFN kernel vs dense: FFN and whole model (issue #14).

Standalone (argparse; no shared harness). Everything is measured in one process, dense and sparse
interleaved rep by rep on the same inputs, medians; wall-clock time.

- FFN: a stack of random MLP layers (SiLU-GLU, 32-neuron experts, column-major ``w_down``; dense uses the
  nn.Linear layout), deep enough that the weights are cold in DRAM (> 2x the last-level cache), for the
  SmolLM2 shape (d=576, I=1536) and a Llama-3-8B-like shape (d=4096, I=14336). The sparse call is exactly
  what a converted dynamic-k MLP runs at inference: ``condify.ops.sparse_ffn`` (router
  ``Linear(d,128)->ReLU->Linear(128,E)->abs``, tau*max selection, selected experts). Routers are
  random-init (nn.Linear default) and inputs Gaussian: this measures speed, not quality; per-layer tau is
  bisected on held-out random inputs so the executed fraction hits 25 / 50 / 75 %.
- Whole model: the embedded SmolLM2-135M (``condify.data.load_model()``) converted with dynamic-k
  (32-neuron experts, random-init routers, per-layer tau bisected on the MLP inputs of a prompt), against a
  ``condify.unmodify``-ed copy; a manual greedy decode loop with the KV cache, batch 1 and 8.
- Profile of each FFN configuration: router+selection (the fused call with nothing selected), experts
  alone (the kernel on the precomputed mask), bytes-only limit, and the union of selected experts.

    python benchmarks/cpu_kernels.py            # full run -> results/cpu_kernels.{md,json,png}; 24.5 min
                                                # at load ~9 on 2 cores, mostly the 2-thread rows (each
                                                # config stops after 3 reps past its time budget)
    python benchmarks/cpu_kernels.py --quick    # a few minutes, 50 % only, fewer reps
    python benchmarks/cpu_kernels.py --profile  # where a batch-1 decode step goes, by module
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
SHAPES = {"smollm2": (576, 1536), "llama8b": (4096, 14336)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPERT = 32
ROUTER_WIDTH = 128


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ----------------------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------------------


def make_layers(d: int, inter: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    from condify.methods.dynamic_k.modules import Router

    g = torch.Generator().manual_seed(seed)
    E = inter // EXPERT
    layers = []
    for _ in range(n):
        up = (torch.randn(inter, d, generator=g) * d**-0.5).to(dtype)
        gate = (torch.randn(inter, d, generator=g) * d**-0.5).to(dtype)
        down = (torch.randn(d, inter, generator=g) * inter**-0.5).to(dtype)
        router = Router(d, ROUTER_WIDTH, E).to(dtype)
        layers.append(
            dict(
                up=up, gate=gate, down_row=down, down_col=down.t().contiguous().t(),
                r=(router.fc1.weight.detach(), router.fc1.bias.detach(), router.fc2.weight.detach(),
                   router.fc2.bias.detach()),
            )
        )  # fmt: skip
    return layers


def fit_tau(scores: torch.Tensor, frac: float) -> float:
    """tau such that the mean fraction of experts with score >= tau * max (argmax always) is ~frac."""
    top = scores.max(-1, keepdim=True).values
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        f = ((scores >= top * mid) | (scores == top)).float().mean().item()
        lo, hi = (mid, hi) if f > frac else (lo, mid)
    return (lo + hi) / 2


def dense_mlp(x, L):
    return F.linear(F.silu(F.linear(x, L["gate"])) * F.linear(x, L["up"]), L["down_row"])


def sparse_mlp(x, L, tau):
    from condify.ops import sparse_ffn

    return sparse_ffn(x, *L["r"], "tau_max", tau, L["up"], L["down_col"], EXPERT, "silu", L["gate"])


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the calling thread). With one torch thread the CPU time excludes the
    time this process was preempted by other jobs on a shared machine; with two it is not meaningful."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def reps_within(reps: int, budget_s: float):
    """Rep indices: at least 3 (medians), at most ``reps``, stopping once ``budget_s`` has passed (an
    oversubscribed shared machine can make one rep 10x slower than on a quiet one)."""
    t0 = time.perf_counter()
    for i in range(reps):
        if i >= 3 and time.perf_counter() - t0 > budget_s:
            return
        yield i


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)


def ffn_runs(xs, layers, taus, masks) -> dict:
    """The timed passes over the layer stack (interleaved in this order in every rep)."""
    from condify.ops import cpu

    ext = cpu.extension()

    def dense():
        for x, L in zip(xs, layers, strict=True):
            dense_mlp(x, L)

    def sparse():
        for x, L, tau in zip(xs, layers, taus, strict=True):
            sparse_mlp(x, L, tau)

    def router():  # router + selection + call overhead: the same fused call, sigmoid >= 2 selects nothing
        for x, L in zip(xs, layers, strict=True):
            cpu.sparse_ffn_cpu(x, *L["r"], "sigmoid", 2.0, L["up"], L["down_col"], EXPERT, "silu", L["gate"])

    def experts():  # the kernel alone on the precomputed selection
        for x, L, m in zip(xs, layers, masks, strict=True):
            ext.expert_mlp(x, L["up"], L["down_col"], m, EXPERT, 1, L["gate"], None, None)

    return {"dense": dense, "sparse": sparse, "router": router, "experts": experts}


@torch.inference_mode()
def bench_ffn(shape: str, dtype_name: str, batches, threads, fracs, reps: int, quick: bool) -> list[dict]:
    from condify.ops import cpu, router_scores_reference

    cpu.extension()
    d, inter = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    bytes_layer = 3 * d * inter * dtype.itemsize
    n_layers = max(2, int((0.6 if quick else 1.2) * 260e6 / bytes_layer) + 1)  # > LLC (260 MB here)
    layers = make_layers(d, inter, n_layers, dtype)
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(256, d, generator=g).to(dtype)
    scores = [router_scores_reference(calib, *L["r"]) for L in layers]
    rows = []
    for frac in fracs:
        taus = [fit_tau(s, frac) for s in scores]
        for T in batches:
            xs = [torch.randn(T, d, generator=g).to(dtype) for _ in layers]
            masks = [sparse_mlp(x, L, t)[1] for x, L, t in zip(xs, layers, taus, strict=True)]
            executed = float(torch.cat(masks).float().mean())
            union = float(torch.stack([m.any(0) for m in masks]).float().mean())
            for nt in threads:
                torch.set_num_threads(nt)
                runs = ffn_runs(xs, layers, taus, masks)
                t = {k: [] for k in runs}
                for _ in reps_within(reps, 6.0):
                    for k, fn in runs.items():
                        t[k].append(timed(fn))
                wall = {k: medians(v)[0] / n_layers * 1e6 for k, v in t.items()}
                cput = {k: medians(v)[1] / n_layers * 1e6 for k, v in t.items()}
                med = cput if nt == 1 else wall  # 1 thread: CPU time (robust to preemption); 2: wall
                row = dict(
                    shape=shape, dtype=dtype_name, batch=T, threads=nt, target=frac, executed=executed,
                    union=union, layers=n_layers, dense_us=med["dense"], sparse_us=med["sparse"],
                    router_us=med["router"], experts_us=med["experts"], speedup=med["dense"] / med["sparse"],
                    speedup_wall=wall["dense"] / wall["sparse"], clock="cpu" if nt == 1 else "wall",
                    limit=1 / (union if T > 1 else executed), load=loadavg(),
                )  # fmt: skip
                rows.append(row)
                print(
                    f"ffn {shape} {dtype_name} b={T} t={nt} exec={executed:.2f} union={union:.2f}: "
                    f"dense {med['dense']:.0f} us, sparse {med['sparse']:.0f} us (x{row['speedup']:.2f}); "
                    f"router {med['router']:.0f}, experts {med['experts']:.0f}  [load {row['load']}]",
                    flush=True,
                )
    torch.set_num_threads(max(threads))
    return rows


def torch_strategies(xs, layers, masks) -> None:
    from condify.ops import cpu

    for x, L, m in zip(xs, layers, masks, strict=True):
        cpu.expert_mlp_torch(x, L["up"], L["down_col"], m, EXPERT, "silu", L["gate"])


@torch.inference_mode()
def bench_crossover(reps: int, tokens=(1, 4, 8, 16, 24, 32, 64, 128)) -> list[dict]:
    """Compiled kernel vs the MKL strategies vs dense over batch size (SmolLM2 shape, fp32, 1 thread,
    50 % random experts per token): where ``condify.ops.cpu._use_kernel``'s rule comes from."""
    from condify.ops import cpu

    cpu.extension()
    d, inter = SHAPES["smollm2"]
    layers = make_layers(d, inter, 24, torch.float32, seed=3)
    E = inter // EXPERT
    torch.set_num_threads(1)
    rows = []
    from condify.ops import router_scores_reference

    calib = torch.randn(256, d)
    taus = [fit_tau(router_scores_reference(calib, *L["r"]), 0.5) for L in layers]
    for T in tokens:
        xs = [torch.randn(T, d) for _ in layers]
        masks = [torch.rand(T, E).argsort(1) < E // 2 for _ in layers]
        runs = ffn_runs(xs, layers, taus, masks)
        runs = {
            "dense": runs["dense"],
            "kernel": runs["experts"],
            "torch": partial(torch_strategies, xs, layers, masks),
            "converted": runs["sparse"],  # router + selection + the strategy chosen for this shape
        }
        t = {k: [] for k in runs}
        for _ in reps_within(reps, 10.0):
            for k, fn in runs.items():
                t[k].append(timed(fn))
        med = {k: medians(v)[1] for k, v in t.items()}  # 1 thread: CPU time
        rows.append({"batch": T, **{k: med["dense"] / med[k] for k in ("kernel", "torch", "converted")}})
        print(
            f"crossover b={T}: kernel x{rows[-1]['kernel']:.2f}, torch strategies x{rows[-1]['torch']:.2f}, "
            f"converted FFN x{rows[-1]['converted']:.2f}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------------------------


def model_pair(dtype: torch.dtype):
    import condify
    from condify.data import load_model

    model, tok = load_model()
    model = model.to(dtype)
    condify.modify(model, "dynamic-k", expert_size=EXPERT)
    dense = condify.unmodify(copy.deepcopy(model))
    return model, dense, tok


@torch.inference_mode()
def mlp_inputs(model, ids) -> dict[str, torch.Tensor]:
    from condify.methods.dynamic_k.modules import converted

    grabbed, hooks = {}, []
    for path, m in converted(model, "mlp"):
        hooks.append(
            m.register_forward_pre_hook(
                lambda mod, a, p=path: grabbed.__setitem__(p, a[0].reshape(-1, a[0].shape[-1]))
            )
        )
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return grabbed


@torch.inference_mode()
def decode(model, ids, steps: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per greedy decode step after a prefill of ``ids``, with the KV cache."""
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def run():
        nonlocal out, past, tok
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    w, c = timed(run)
    return w / steps, c / steps


@torch.inference_mode()
def bench_model(dtype_name, batches, threads, fracs, reps: int, steps: int, fracs_multi=(0.5,)) -> list[dict]:
    """Whole-model decode; more than one thread only at ``fracs_multi`` (time: on a busy shared machine
    each multi-threaded step waits for preempted OpenMP threads)."""
    from condify.data import eval_batches
    from condify.methods.dynamic_k import track_executed
    from condify.methods.dynamic_k.modules import converted, set_tau
    from condify.ops import router_scores_reference

    dtype = DTYPES[dtype_name]
    model, dense, tok = model_pair(dtype)
    down = converted(model, "mlp")[0][1].down_proj.weight
    assert down.t().is_contiguous(), "w_down lost its column-major layout"
    text = eval_batches(tok, split="validation", num_sequences=8, seq_len=64, batch_size=8)[0]
    prompts = {b: text[:b, :24] for b in batches}
    inputs = mlp_inputs(model, text[:8, :64])
    scores = {
        p: router_scores_reference(
            inputs[p], m.router.fc1.weight, m.router.fc1.bias, m.router.fc2.weight, m.router.fc2.bias
        )
        for p, m in converted(model, "mlp")
    }
    rows = []
    for frac in fracs:
        set_tau(model, {p: fit_tau(s, frac) for p, s in scores.items()})
        for b in batches:
            ids = prompts[b]
            with track_executed(model) as stats:
                decode(model, ids, 4)
            executed = sum(v[0] for v in stats.values()) / sum(v[1] for v in stats.values())
            for nt in threads:
                if nt > 1 and frac not in fracs_multi:
                    continue
                torch.set_num_threads(nt)
                decode(dense, ids, 2), decode(model, ids, 2)  # warm-up
                td, ts = [], []
                for _ in reps_within(reps, 12.0):
                    td.append(decode(dense, ids, steps))
                    ts.append(decode(model, ids, steps))
                (dw, dc), (sw, sc) = medians(td), medians(ts)
                d_, s_ = (dc, sc) if nt == 1 else (dw, sw)
                row = dict(
                    dtype=dtype_name, batch=b, threads=nt, target=frac, executed=executed, dense_ms=d_ * 1e3,
                    sparse_ms=s_ * 1e3, speedup=d_ / s_, speedup_wall=dw / sw, clock="cpu" if nt == 1 else "wall",
                    load=loadavg(),
                )  # fmt: skip
                rows.append(row)
                print(
                    f"model {dtype_name} b={b} t={nt} exec={executed:.2f}: dense {row['dense_ms']:.1f} ms/step, "
                    f"sparse {row['sparse_ms']:.1f} (x{row['speedup']:.2f})  [load {row['load']}]",
                    flush=True,
                )
    torch.set_num_threads(max(threads))
    return rows


@torch.inference_mode()
def profile_model(dtype_name: str = "fp32", frac: float = 0.5, steps: int = 8, reps: int = 5) -> dict:
    """Where a batch-1 decode step goes (1 thread, CPU time, forward hooks): the MLPs (router, selection,
    experts and moe_forward's Python), attention, lm_head, the rest; dense vs converted."""
    from condify.data import eval_batches
    from condify.methods.dynamic_k.modules import converted, set_tau
    from condify.ops import router_scores_reference

    torch.set_num_threads(1)
    model, dense, tok = model_pair(DTYPES[dtype_name])
    text = eval_batches(tok, split="validation", num_sequences=8, seq_len=64, batch_size=8)[0]
    inputs = mlp_inputs(model, text[:8, :64])
    taus = {}
    for p, m in converted(model, "mlp"):
        r = m.router
        taus[p] = fit_tau(
            router_scores_reference(inputs[p], r.fc1.weight, r.fc1.bias, r.fc2.weight, r.fc2.bias), frac
        )
    set_tau(model, taus)

    def instrument(m):
        acc, start = dict.fromkeys(("mlp", "attn", "lm_head"), 0.0), {}
        for name, mod in m.named_modules():
            kind = {"mlp": "mlp", "self_attn": "attn", "lm_head": "lm_head"}.get(name.rsplit(".", 1)[-1])
            if kind:
                mod.register_forward_pre_hook(lambda mod, a, k=kind: start.__setitem__(k, time.thread_time()))
                mod.register_forward_hook(
                    lambda mod, a, o, k=kind: acc.__setitem__(k, acc[k] + time.thread_time() - start[k])
                )
        return acc

    accs = {"dense": instrument(dense), "sparse": instrument(model)}
    samples: dict[str, list[dict]] = {k: [] for k in accs}
    ids = text[:1, :24]
    for _ in range(reps):
        for name, m in (("dense", dense), ("sparse", model)):
            out = m(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            acc = accs[name]
            for k in acc:
                acc[k] = 0.0
            c0 = time.thread_time()
            for _ in range(steps):
                out = m(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            total = (time.thread_time() - c0) / steps
            samples[name].append({"total": total * 1e3, **{k: v / steps * 1e3 for k, v in acc.items()}})
    res = {}
    for name, rows in samples.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["other"] = med["total"] - med["mlp"] - med["attn"] - med["lm_head"]
        res[name] = med
        print(
            f"profile {dtype_name} {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()),
            flush=True,
        )
    return res


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_kernels.json").write_text(json.dumps(res, indent=1))
    L = [
        "# Compiled CPU sparse-FFN kernel vs dense (issue #14)",
        "",
        f"Machine: {res['cpu']} ({res['cores']} cores, shared with other engineers' jobs: load averages "
        f"per row), torch {res['torch']}. Command: `{res['command']}`; {res['minutes']:.1f} min. "
        "Medians, dense and sparse interleaved rep by rep on the same inputs. Times and **x** are the CPU "
        "time of the calling thread at 1 thread (it excludes preemption by the other jobs on this shared "
        "machine; memory-bandwidth contention remains) and wall-clock at 2 threads (OpenMP threads of a "
        "busy machine wait on each other: 2-thread rows are only meaningful when the load is < 1); "
        "`x wall` is always the wall-clock ratio.",
        "Routers are random-init (nn.Linear default) with per-layer tau bisected to the target executed "
        "fraction on held-out inputs: speed only, not quality. 32-neuron experts, SiLU-GLU, w_down "
        "column-major (as dynamic-k stores it); dense is the nn.Linear MLP (three F.linear).",
        "",
        "## FFN decode (one MLP: router + selection + experts vs the dense MLP)",
        "",
        "Per-layer times; a stack of layers larger than 2x the LLC so the weights stream from DRAM. "
        "`limit` = bytes-only limit (1/executed at batch 1, 1/union at batch > 1, router excluded). "
        "Profile columns: `router` = the same fused call with nothing selected (router, selection, "
        "allocation, Python call); `experts` = the kernel alone on the precomputed mask.",
        "",
        "| shape | dtype | batch | threads | target | executed | union | dense us | sparse us | **x** | x wall | limit | router us (% dense) | experts us | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ffn"]:
        L.append(
            f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['threads']} | {r['target']:.2f} | {r['executed']:.2f} "
            f"| {r['union']:.2f} | {r['dense_us']:.0f} | {r['sparse_us']:.0f} | **{r['speedup']:.2f}** "
            f"| {r['speedup_wall']:.2f} | {r['limit']:.2f} | {r['router_us']:.0f} ({100 * r['router_us'] / r['dense_us']:.1f} %) "
            f"| {r['experts_us']:.0f} | {r['load']} |"
        )
    if res.get("crossover"):
        L += [
            "",
            "## Batch-size crossover (SmolLM2 shape, fp32, 1 thread, CPU time)",
            "",
            "Experts only on a random 50 % of experts per token: the compiled kernel vs the plain-torch (MKL) "
            "strategies; and the converted FFN as a dynamic-k MLP runs it (router + tau*max selection at "
            "~50 % + the strategy chosen for the shape), all vs the dense MLP. 512 tokens = prefill.",
            "",
            "| tokens | compiled kernel x | plain-torch strategies x | converted FFN x |",
            "|---|---|---|---|",
        ]
        L += [
            f"| {r['batch']} | {r['kernel']:.2f} | {r['torch']:.2f} | {r['converted']:.2f} |"
            for r in res["crossover"]
        ]
    if res.get("model"):
        L += [
            "",
            "## Whole-model decode (embedded SmolLM2-135M, dynamic-k vs the unmodified copy)",
            "",
            "| dtype | batch | threads | target | executed | dense ms/step | sparse ms/step | **x** | x wall | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["model"]:
            L.append(
                f"| {r['dtype']} | {r['batch']} | {r['threads']} | {r['target']:.2f} | {r['executed']:.2f} "
                f"| {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | **{r['speedup']:.2f}** | {r['speedup_wall']:.2f} | {r['load']} |"
            )
    (out / "cpu_kernels.md").write_text("\n".join(L) + "\n" + res.get("notes", ""))
    plot(res, out / "cpu_kernels.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape"], r["dtype"]) for r in res["ffn"]})
    n = len(panels) + (1 if res.get("model") else 0)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False)
    for ax, (shape, dt) in zip(axes[0][: len(panels)], panels, strict=True):
        for b in sorted({r["batch"] for r in res["ffn"]}):
            for nt in sorted({r["threads"] for r in res["ffn"]}):
                rs = [
                    r
                    for r in res["ffn"]
                    if (r["shape"], r["dtype"], r["batch"], r["threads"]) == (shape, dt, b, nt)
                ]
                if rs:
                    ax.plot(
                        [r["executed"] for r in rs], [r["speedup"] for r in rs], "o-", label=f"b={b} t={nt}"
                    )
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set(title=f"FFN {shape} {dt}", xlabel="executed fraction", ylabel="x vs dense")
        ax.legend(fontsize=7)
    if res.get("model"):
        ax = axes[0][-1]
        for dt in sorted({r["dtype"] for r in res["model"]}):
            for b in sorted({r["batch"] for r in res["model"]}):
                for nt in sorted({r["threads"] for r in res["model"]}):
                    rs = [r for r in res["model"] if (r["dtype"], r["batch"], r["threads"]) == (dt, b, nt)]
                    ax.plot(
                        [r["executed"] for r in rs],
                        [r["speedup"] for r in rs],
                        "o-",
                        label=f"{dt} b={b} t={nt}",
                    )
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set(title="SmolLM2 whole-model decode", xlabel="executed fraction", ylabel="x vs dense")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer reps and configurations (~2 min)")
    ap.add_argument("--shapes", default="smollm2,llama8b")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model decode")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--from-json", type=Path, help="re-render the report and plot of a saved run, no timing")
    ap.add_argument("--profile", action="store_true", help="only the batch-1 decode-step profile (by module)")
    a = ap.parse_args()
    if a.profile:
        for dt in a.dtypes.split(","):
            profile_model(dt)
        return
    if a.from_json:
        write_report(json.loads(a.from_json.read_text()), a.out)
        return
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    fracs = [0.5] if a.quick else [float(v) for v in a.fractions.split(",")]
    threads, batches = ints(a.threads), ints(a.batches)
    from condify.ops import cpu

    assert cpu.extension() is not None, "the compiled CPU kernel did not build"
    t0 = time.time()
    res: dict = dict(
        cpu=cpu_name(), cores=torch.get_num_threads(), torch=torch.__version__,
        command="python benchmarks/cpu_kernels.py" + (" --quick" if a.quick else ""), load_start=loadavg(),
        ffn=[], model=[], crossover=[],
    )  # fmt: skip
    for shape in a.shapes.split(","):
        for dt in a.dtypes.split(","):
            reps = (5 if a.quick else 7) if shape == "smollm2" else 3
            res["ffn"] += bench_ffn(shape, dt, batches, threads, fracs, reps, a.quick)
    if not a.no_crossover:
        res["crossover"] = bench_crossover(
            3 if a.quick else 5, (1, 8, 16, 32, 64) if a.quick else (1, 4, 8, 16, 24, 32, 64, 128, 512)
        )
    if not a.no_model:
        for dt in a.dtypes.split(","):
            res["model"] += bench_model(
                dt, batches, threads, fracs, 3 if a.quick else 5, 6 if a.quick else 12
            )
    res["minutes"] = (time.time() - t0) / 60
    res["load_end"] = loadavg()
    write_report(res, a.out)
    print(f"wrote {a.out / 'cpu_kernels.md'} in {res['minutes']:.1f} min")


if __name__ == "__main__":
    main()
