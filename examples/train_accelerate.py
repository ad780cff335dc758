"""Train a converted SmolLM2 in your own loop with accelerate: one process, or data-parallel on several.

condify's per-step terms go in by hand: ``condify.training_loss(model)`` on top of the LM loss, and
``condify.integrations.step(model)`` after each optimiser step (mod-threshold: the router biases move
so each gated layer keeps ``capacity`` of the tokens; under DDP the shift is averaged over the ranks).

python examples/train_accelerate.py --steps 20                        # one process (CPU or one GPU)
accelerate launch --num_processes 8 examples/train_accelerate.py      # 8 GPUs, DDP
torchrun --nproc-per-node 8 examples/train_accelerate.py              # the same, with torch's launcher
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

import condify
from condify import data, evaluate
from condify.integrations import attach, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="mod-threshold", choices=sorted(condify.list_methods()))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default=None, help="save the trained model here (rank 0)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (the default without CUDA; gloo)")
    args = p.parse_args()

    # some methods' routers are fitted, not trained by gradient (dynamic-k, lte): DDP must allow unused parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), kwargs_handlers=[ddp])
    model, tok = data.load_model()
    recipe = condify.registry.get(args.method).recipes["quick"]
    condify.modify(model, args.method, **recipe.modify)
    calib = data.train_batches(tok, recipe.data.num_batches, recipe.data.batch_size, recipe.data.seq_len)
    condify.calibrate(model, calib, progress=False, **recipe.calibrate)  # same data on every rank: same model

    attach(model)  # arm condify's recording before the first forward
    windows = torch.cat(data.train_batches(tok, args.steps * accelerator.num_processes, 2, args.seq_len))
    loader = torch.utils.data.DataLoader(
        windows, batch_size=2, shuffle=False
    )  # accelerate shards it per rank
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt, loader = accelerator.prepare(model, opt, loader)

    model.train()
    for i, ids in enumerate(loader):
        loss = model(input_ids=ids, labels=ids).loss + condify.training_loss(model)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        status = step(model)  # every rank calls it: it all-reduces
        mean = accelerator.reduce(loss.detach(), reduction="mean")
        if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
            accelerator.print(f"step {i}: loss {mean.item():.3f} {status}")

    model = accelerator.unwrap_model(model).eval()
    test = data.eval_batches(tok, "test", num_sequences=4, seq_len=args.seq_len, batch_size=4)
    accelerator.print(
        f"processes: {accelerator.num_processes}; held-out perplexity {evaluate.perplexity(model, test, progress=False):.2f}"
    )
    if args.out and accelerator.is_main_process:
        condify.save_pretrained(model, args.out)  # rank 0 writes; every rank holds the same weights
        accelerator.print(f"saved to {args.out}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
