"""Overhead against PEFT: one training step of cl-scale IncLoRA / GainLoRA (one task) over PEFT LoRA.

    python bench/peft_overhead.py

The same tiny Llama (hidden 512, 4 layers, same random base weights), the same batch, the same r,
alpha and targets (q_proj, v_proj), no dropout; one process, plain PyTorch AdamW on both sides, no
DeepSpeed. A step is forward with labels, backward, optimizer step, zero_grad; the cl-scale side
also runs what the trainer runs around a step: `method.loss`, `before_step`, `after_step` (GainLoRA's
update projection is a no-op in the first task, as it has no old subspace yet).
GainLoRA takes its branches from InfLoRA (the default): only B and the gate train, A is designed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    TARGETS,
    Batch,
    add_device_argument,
    add_timing_arguments,
    add_tiny_llama_arguments,
    header,
    interleaved,
    method_step,
    peft_step,
    print_ratios,
)

from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config
from cl_scale.methods import build_method, method_class
from cl_scale.modeling.wrapper import IGNORE_INDEX, ContinualModel
from cl_scale.recipe import MethodConfig


def make_batch(vocab: int, batch: int, prompt: int, answer: int) -> Batch:
    """Random tokens, no padding; the loss covers the answer only (as the decoder-only collator does)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, prompt + answer), generator=generator)
    prompt_mask = torch.zeros_like(ids)
    prompt_mask[:, :prompt] = 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "prompt_mask": prompt_mask,
        "labels": ids.masked_fill(prompt_mask == 1, IGNORE_INDEX),
    }


def cl_scale_step(
    base: torch.nn.Module, batch: Batch, method_name: str, rank: int, alpha: float, lr: float
) -> Callable[[], None]:
    """A training step of cl-scale `method_name` on its first task (on the batch's device), driven like the
    trainer drives it."""
    config = MethodConfig(name=method_name, rank=rank, alpha=alpha)
    model = ContinualModel(
        base,
        kind="causal",
        target_modules=TARGETS,
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        gate_hidden=config.gate.hidden if method_class(method_name).gated else None,
    )
    return method_step(model, build_method(config, model, num_tasks=1), [batch], lr=lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_llama_arguments(parser, hidden=512, heads=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=96, help="prompt tokens per sample")
    parser.add_argument("--answer", type=int, default=32, help="answer tokens per sample (the loss covers these)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    add_timing_arguments(parser, repeats=30)
    add_device_argument(parser)
    args = parser.parse_args()
    header("overhead against PEFT: one training step, tiny Llama, one task", args.threads)
    config = tiny_llama_config(
        args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.heads,
        intermediate=int(args.hidden * 2.6875),
    )
    print(
        f"# hidden {args.hidden}  layers {args.layers}  heads {args.heads}  vocab {args.vocab}  "
        f"batch {args.batch} x {args.prompt + args.answer} tokens  r {args.rank}  alpha {args.alpha:g}  "
        f"targets {','.join(TARGETS)}  float32  AdamW"
    )
    batch = {k: v.to(args.device) for k, v in make_batch(args.vocab, args.batch, args.prompt, args.answer).items()}
    cases = {"peft": peft_step(build_tiny_model(config, seed=0), [batch], rank=args.rank, alpha=args.alpha, lr=args.lr)}
    for name in ("inclora", "gainlora"):
        cases[name] = cl_scale_step(build_tiny_model(config, seed=0), batch, name, args.rank, args.alpha, args.lr)
    timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
    print_ratios(
        timings,
        [
            ("PEFT LoRA (reference)", "peft", "peft"),
            ("cl-scale IncLoRA / PEFT", "inclora", "peft"),
            ("cl-scale GainLoRA / PEFT", "gainlora", "peft"),
        ],
    )


if __name__ == "__main__":
    main()
