"""Fine-tune a converted SmolLM2 with LoRA (peft) under the Hugging Face Trainer.

mod-threshold lets tokens skip layers by a learned threshold router; ``condify.integrations.CondifyTrainer``
keeps the keep-rate at the target while LoRA trains (after every optimiser step it moves the router
biases, as ``condify.calibrate`` does). The adapters are then merged and the model saved and reloaded.

python examples/finetune_lora.py --steps 40
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import condify
from condify import data, evaluate
from condify.integrations import CondifyTrainer


class Windows(torch.utils.data.Dataset):
    """Token windows as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.rows = torch.cat(batches)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def keep_rate(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Fraction of tokens that take the gated layers, measured on ``batches``."""
    with condify.track(model) as t:
        evaluate.perplexity(model, batches, progress=False)
    return t.fraction("mod-threshold")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimiser steps of LoRA training")
    p.add_argument("--capacity", type=float, default=0.75, help="fraction of tokens each gated layer keeps")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=8)
    args = p.parse_args()

    model, tok = data.load_model()
    condify.modify(model, "mod-threshold", capacity=args.capacity)
    # training-free calibration (steps=0): routers from a ridge regression, biases fitted to the capacity
    condify.calibrate(model, data.train_batches(tok, 4, 2, args.seq_len), steps=0, progress=False)

    test = data.eval_batches(
        tok, "test", num_sequences=args.eval_sequences, seq_len=args.seq_len, batch_size=4
    )
    before = evaluate.perplexity(model, test, progress=False), keep_rate(model, test)

    # LoRA on the attention projections; everything else (routers included) stays frozen
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora.print_trainable_parameters()
    train = Windows(data.train_batches(tok, args.steps, 2, args.seq_len))
    with tempfile.TemporaryDirectory() as out:
        trainer = CondifyTrainer(
            model=lora,
            args=TrainingArguments(
                out, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-3,
                lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 4), use_cpu=True,
                report_to="none", save_strategy="no", disable_tqdm=True,
            ),
            train_dataset=train,
        )  # fmt: skip
        trainer.train()
    model = lora.merge_and_unload().eval()  # the converted model, LoRA deltas folded into its weights
    after = evaluate.perplexity(model, test, progress=False), keep_rate(model, test)

    print(f"perplexity: {before[0]:.2f} -> {after[0]:.2f} after {args.steps} LoRA steps")
    print(f"keep rate: {before[1]:.3f} -> {after[1]:.3f} (capacity {args.capacity})")

    with tempfile.TemporaryDirectory() as d:
        condify.save_pretrained(model, d)
        again = condify.from_pretrained(d)
        ids = test[0][:1]
        same = torch.equal(again(ids).logits, model(ids).logits)
        print(f"reloaded: identical logits = {same}")


if __name__ == "__main__":
    main()
