"""Generation throughput: the gated continual model (GainLoRA, several tasks) against the same HF model bare.

    python bench/generation_throughput.py                    # hidden 256, 4 layers, 5 tasks, batch 8
    python bench/generation_throughput.py --tasks 15 --new-tokens 64

The same tiny Llama (same random base weights) twice: once plain, once as a `ContinualModel` with `--tasks`
branches on q_proj and v_proj (random non-zero A and B) and as many gates. Both decode the same batch
greedily with the KV cache, exactly `--new-tokens` tokens per sample (no EOS, so both produce the same
number of tokens). The gated side computes its coefficients once from the prompt, as `cl-scale eval` does.
Printed: generated tokens/s of each side, and the paired time ratio gated / plain (1.0 = no cost).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    TARGETS,
    add_device_argument,
    add_timing_arguments,
    add_tiny_llama_arguments,
    header,
    interleaved,
    median,
    print_ratios,
)

from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config
from cl_scale.modeling.wrapper import ContinualModel, greedy_config


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    """The tiny Llama without EOS, so every sample decodes exactly --new-tokens tokens."""
    config = tiny_llama_config(
        args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.heads,
        intermediate=args.hidden * 2, pad_token_id=0,
    )
    config.eos_token_id = None
    model = build_tiny_model(config, seed=0)
    model.generation_config.eos_token_id = None
    return model.eval()


def gated_model(args: argparse.Namespace) -> ContinualModel:
    """The same base with --tasks random non-zero branches and gates (GainLoRA after --tasks stages)."""
    model = ContinualModel(
        base_model(args), kind="causal", target_modules=TARGETS, rank=args.rank, alpha=32.0, dropout=0.0,
        gate_hidden=100,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(args.tasks):
        model.add_branches(generator)
        model.add_gate(generator)
    with torch.no_grad():
        for layer in model.branched.values():
            for _, b in layer.branches():
                b.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_llama_arguments(parser, hidden=256, heads=4)
    parser.add_argument("--tasks", type=int, default=5, help="branches per target layer and gates")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per sample")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sample")
    add_timing_arguments(parser, repeats=10)
    add_device_argument(parser)
    args = parser.parse_args()
    header("generation throughput: gated continual model against the bare HF model", args.threads)
    print(
        f"# hidden {args.hidden}  layers {args.layers}  vocab {args.vocab}  tasks {args.tasks}  r {args.rank}  "
        f"batch {args.batch}  prompt {args.prompt}  new tokens {args.new_tokens}  greedy, KV cache, float32"
    )
    ids = torch.randint(4, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    plain, gated = base_model(args).to(args.device), gated_model(args).to(args.device)
    config = greedy_config(plain, args.new_tokens)

    def run_plain() -> None:
        with torch.no_grad():
            plain.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    def run_gated() -> None:
        gated.generate(ids, mask, mask, max_new_tokens=args.new_tokens)

    cases: dict[str, Callable[[], None]] = {"plain": run_plain, "gated": run_gated}
    timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
    tokens = args.batch * args.new_tokens
    for name in cases:
        print(f"{name:6} {tokens / median(timings.wall, name):10.1f} tokens/s (wall)")
    print_ratios(
        timings,
        [("bare HF model (reference)", "plain", "plain"), (f"gated, {args.tasks} tasks / bare", "gated", "plain")],
    )


if __name__ == "__main__":
    main()
