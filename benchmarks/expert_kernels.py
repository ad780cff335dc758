"""expert_mlp vs the dense MLP (three F.linear), at executed fractions 100/75/50/25 %.

Batches 1, 8, 64 (decode) and a 512-token prefill; SmolLM2-135M's MLP (d=576, I=1536, SiLU-GLU) and a
Llama-3-8B-like MLP (4096/14336). On CUDA: the Triton path, timed with CUDA events. On CPU: the reference
path (``expert_mlp_torch``, the plain-torch strategies, "auto" unless told) with a fixed thread count.

Every timing rotates through ``--layers`` copies of the weights (like the layers of a model), so the
weights come from memory rather than a warm cache; dense and expert timings are interleaved repeat by
repeat and the speedup is the median of the per-repeat ratios (robust to other processes on the machine).
Masks select exactly round(f*E) experts per token, at random per token (``--pattern random``), or the
first ones (``--pattern contiguous``: one run per token, the best case for the CPU path).

    python benchmarks/expert_kernels.py --shape smollm2 --threads 2 --out benchmarks/results/expert_kernels_cpu.md
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import harness
import torch
import torch.nn.functional as F
from torch import Tensor

from condify.ops import cpu as ref_mod
from condify.ops import expert_mlp, expert_mlp_torch

SHAPES = {"smollm2": (576, 1536), "llama8b": (4096, 14336)}
QUICK = dict(expert_sizes="64", fractions="0.5", batches="1", layers=1, repeats=1)


def make_mask(T: int, E: int, frac: float, pattern: str, g: torch.Generator) -> torch.Tensor:
    """(T, E) mask with exactly round(frac * E) experts per token: the first ones or random ones."""
    k = max(0, min(E, round(frac * E)))
    if pattern == "contiguous":
        mask = torch.zeros(T, E, dtype=torch.bool)
        mask[:, :k] = True
        return mask
    order = torch.rand(T, E, generator=g).argsort(dim=1)
    return order < k


def timer(device: torch.device, clock: str = "wall") -> harness.Timer:
    """Seconds of one call of fn (CUDA: events; CPU: wall clock, or this thread's CPU time, which leaves
    out the time other processes hold the cores; meaningful with one thread)."""
    if device.type == "cuda":

        def run(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    if clock == "wall":
        return harness.wall

    def thread_time(fn: Callable[[], object]) -> float:
        t0 = time.thread_time()
        fn()
        return time.thread_time() - t0

    return thread_time


def strategy_of(mask: torch.Tensor, s: int, d: int) -> str:
    """The CPU reference path's strategy for ``mask``. Uses a private condify helper."""
    strategy, spans = ref_mod._choose_strategy(mask, s, d)
    return f"spans ({len(spans)})" if strategy == "spans" else strategy


def bench_one(
    layers: list,
    x: Tensor,
    mask: Tensor,
    s: int,
    strategy: str,
    repeats: int,
    device: torch.device,
    clock: str,
) -> tuple[float, float, float]:
    """(dense seconds, expert seconds, median speedup) per layer."""

    def dense() -> None:
        for wg, wu, wd in layers:
            F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def expert() -> None:
        for wg, wu, wd in layers:
            if device.type == "cuda":
                expert_mlp(x, wu, wd, mask, s, "silu", wg)
            else:
                expert_mlp_torch(x, wu, wd, mask, s, "silu", wg, strategy=strategy)

    t = harness.interleaved(
        {"d": dense, "e": expert}, repeats, warmup=2, rotate=False, timer=timer(device, clock)
    )
    td, te = ([v / len(layers) for v in t[k]] for k in "de")
    ratio = statistics.median(a / b for a, b in zip(td, te, strict=True))
    return statistics.median(td), statistics.median(te), ratio


def main() -> None:
    p = harness.parser(
        __doc__, threads=2, out=None, out_help="also write the markdown table to this file", model=False
    )
    p.add_argument("--shape", choices=[*SHAPES, "all"], default="smollm2")
    p.add_argument("--expert-sizes", default="8,16,32,64,128")
    p.add_argument("--fractions", default="1,0.75,0.5,0.25")
    p.add_argument("--batches", default="1,8,64,512")
    p.add_argument("--pattern", choices=["random", "contiguous"], default="random")
    p.add_argument("--strategy", default="auto", help="CPU reference strategy: auto, runs, grouped, dense")
    p.add_argument(
        "--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=0, help="weight copies to rotate (0: enough for 128 MiB)")
    p.add_argument("--repeats", type=int, default=0, help="0: 25 for T<=8, 9 for T=64, 5 for prefill")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="CPU: wall clock or thread CPU time"
    )
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    a = harness.parse(p, QUICK)

    device = torch.device(a.device)
    dtype = (
        getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    harness.setup(a)
    shapes = list(SHAPES) if a.shape == "all" else [a.shape]
    sizes = [int(v) for v in a.expert_sizes.split(",")]
    fracs = [float(v) for v in a.fractions.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    g = torch.Generator().manual_seed(a.seed)

    env = harness.environment(device)
    machine = env["device"] if device.type == "cuda" else f"{env['device']}, {env['cpu_count']} logical cores"
    headers = [
        "shape",
        "expert size",
        "tokens",
        "executed",
        "dense (us)",
        "expert_mlp (us)",
        "speedup",
        "strategy",
    ]
    head = [
        f"# expert_mlp vs dense MLP ({device.type})",
        "",
        f"- machine: {machine}; torch {env['torch']}; {dtype}; "
        + (
            f"{a.threads} threads; load average at start {float(env['load_average']):.1f}"
            if device.type == "cpu"
            else "CUDA events"
        ),
        f"- path: {'Triton kernels' if device.type == 'cuda' else f'expert_mlp_torch, strategy={a.strategy}'}; "
        f"masks: {a.pattern}, exactly round(f*E) experts per token; SiLU-GLU, no biases",
        "- times are per MLP, median over repeats, weights rotated over several copies (cold caches); "
        "speedup = median of per-repeat dense/expert ratios",
        "",
    ]
    print("\n".join([*head, harness.table(headers, [])]), flush=True)
    rows = []
    for shape in shapes:
        d, inter = SHAPES[shape]
        bytes_per_copy = 3 * d * inter * torch.finfo(dtype).bits // 8
        L = a.layers or max(1, min(16, (128 << 20) // bytes_per_copy))
        layers = [
            tuple(
                (torch.randn(*shp, generator=g) * shp[1] ** -0.5).to(device=device, dtype=dtype)
                for shp in ((inter, d), (inter, d), (d, inter))
            )
            for _ in range(L)
        ]
        for s in sizes:
            E = inter // s
            for T in batches:
                x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
                reps = a.repeats or (25 if T <= 8 else 9 if T <= 64 else 5)
                for f in fracs:
                    mask = make_mask(T, E, f, a.pattern, g).to(device)
                    with torch.no_grad():
                        lay = layers if T <= 8 else layers[:2]  # compute-bound: no need to rotate
                        td, te, ratio = bench_one(lay, x, mask, s, a.strategy, reps, device, a.clock)
                    executed = mask.float().mean().item()
                    if device.type == "cuda":
                        strat = "triton " + ("grouped" if T > 32 else "decode")
                    else:
                        strat = strategy_of(mask.cpu(), s, d) if a.strategy == "auto" else a.strategy
                    cells = [f"{shape} {d}/{inter}", s, T, f"{executed:.0%}", f"{td * 1e6:.0f}", f"{te * 1e6:.0f}",
                             f"{ratio:.2f}x", strat]  # fmt: skip
                    rows.append(cells)
                    print(harness.row(cells), flush=True)
    if a.out:
        harness.write_markdown(a.out, [*head, harness.table(headers, rows)], append=a.append)


if __name__ == "__main__":
    main()
