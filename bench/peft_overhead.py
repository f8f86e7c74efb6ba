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
from common import add_device_argument, add_timing_arguments, header, interleaved, print_ratios
from peft import LoraConfig, get_peft_model

from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config
from cl_scale.distributed import LocalAccess
from cl_scale.methods import build_method, method_class
from cl_scale.modeling.wrapper import IGNORE_INDEX, ContinualModel
from cl_scale.recipe import MethodConfig
from cl_scale.stage_runner import StageRunner

TARGETS = ["q_proj", "v_proj"]
Batch = dict[str, torch.Tensor]


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


def peft_step(base: torch.nn.Module, batch: Batch, rank: int, alpha: float, lr: float) -> Callable[[], None]:
    """A training step of PEFT LoRA on `base` (on the batch's device)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    model = get_peft_model(base, config).to(batch["input_ids"].device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    inputs = {k: v for k, v in batch.items() if k != "prompt_mask"}

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


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
    method = build_method(config, model, num_tasks=1)
    method.grow(0, torch.Generator().manual_seed(0))
    model.to(batch["input_ids"].device)
    params = method.trainable_parameters(0)
    runner = StageRunner(0, 1, LocalAccess(), model, [batch])
    method.before_task(runner)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step() -> None:
        output = model(**batch)
        loss, _ = method.loss(output.loss, model.context)
        loss.backward()
        method.before_step(runner)
        optimizer.step()
        method.after_step(runner)
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
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
    cases = {"peft": peft_step(build_tiny_model(config, seed=0), batch, args.rank, args.alpha, args.lr)}
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
