"""Subspace pass: bytes the statistics reduction sends per target module, and its time against an epoch.

    python bench/subspace_pass.py

1. Bytes. Two gloo ranks (spawned here) each collect the second moments of every target module's
   inputs (`collect_layer_inputs`) and of the newest gate (`collect_gate_moments`) over their shard,
   for two data sizes; `torch.distributed.all_reduce` is wrapped to count the bytes of every tensor
   it reduces. The figure must not depend on the number of samples (it is d x d float64 + a count).
2. Time, one process: one statistics pass (GainLoRA's: the layer moments of every target module and
   the gate moments, in one no-grad pass, up to the finished matrices) over one training epoch on the
   same data (forward, backward, AdamW step per batch), with a plain no-grad forward pass for scale.

Model: tiny Llama (hidden 512, 4 layers, q and v targets: 8 modules), GainLoRA with InfLoRA branches.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import Batch, add_timing_arguments, add_tiny_llama_arguments, header, interleaved, print_ratios

from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config
from cl_scale.methods import build_method
from cl_scale.modeling.wrapper import IGNORE_INDEX, ContinualModel
from cl_scale.recipe import MethodConfig
from cl_scale.subspace import collect_gate_moments, collect_layer_inputs, layer_statistics


def gainlora_model(hidden: int, layers: int, vocab: int) -> tuple[ContinualModel, list[torch.nn.Parameter]]:
    """A tiny Llama with GainLoRA's first task grown; returns it and the task's trainable parameters."""
    config = tiny_llama_config(
        vocab, hidden=hidden, layers=layers, heads=8, kv_heads=8, intermediate=int(hidden * 2.6875)
    )
    method_config = MethodConfig(name="gainlora", rank=8, alpha=32.0)
    model = ContinualModel(
        build_tiny_model(config, seed=0),
        kind="causal",
        target_modules=None,
        rank=method_config.rank,
        alpha=method_config.alpha,
        dropout=0.0,
        gate_hidden=method_config.gate.hidden,
    )
    method = build_method(method_config, model, num_tasks=1)
    method.grow(0, torch.Generator().manual_seed(0))
    return model, method.trainable_parameters(0)


def batches(samples: int, batch_size: int, tokens: int, vocab: int, seed: int) -> list[Batch]:
    """Right-padded batches of varied length; the first half of each sample is its prompt."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, samples, batch_size):
        size = min(batch_size, samples - start)
        ids = torch.randint(4, vocab, (size, tokens), generator=generator)
        lengths = torch.randint(tokens // 2, tokens + 1, (size,), generator=generator)
        positions = torch.arange(tokens).unsqueeze(0)
        attention = (positions < lengths.unsqueeze(1)).long()
        prompt = (positions < (lengths // 2).unsqueeze(1)).long()
        labels = ids.masked_fill((attention == 0) | (prompt == 1), IGNORE_INDEX)
        out.append({"input_ids": ids, "attention_mask": attention, "prompt_mask": prompt, "labels": labels})
    return out


def forward_pass(model: ContinualModel, data: list[Batch]) -> None:
    """One no-grad forward over `data` (what a runner's data_pass does)."""
    model.eval()
    with torch.no_grad():
        for batch in data:
            model(**batch)
    model.train()


def statistics_pass(model: ContinualModel, data: list[Batch]) -> dict[str, torch.Tensor]:
    """GainLoRA's statistics in one pass: every target module's input moment and the gate moments."""
    assert model.gates is not None
    with collect_gate_moments(model.gates) as gate:
        layers = dict(layer_statistics(model.branched, model.context, lambda: forward_pass(model, data), None))
    return {**layers, "gate.input": gate.input.value(), "gate.output": gate.output.value()}


def training_epoch(model: ContinualModel, optimizer: torch.optim.Optimizer, data: list[Batch]) -> None:
    """One epoch: forward, backward and an AdamW step per batch."""
    for batch in data:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _count_bytes(rank: int, world: int, port: int, sizes: list[int], args: argparse.Namespace, out: str) -> None:
    """Rank body: count the bytes all-reduced by the layer and gate statistics for each data size."""
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    torch.set_num_threads(1)
    reduced: list[int] = []
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *rest: object, **kwargs: object) -> object:
        reduced.append(tensor.numel() * tensor.element_size())
        return original(tensor, *rest, **kwargs)

    dist.all_reduce = counting
    model, _ = gainlora_model(args.hidden, args.layers, args.vocab)
    assert model.gates is not None
    results = []
    for samples in sizes:
        data = batches(samples // world, args.batch, args.tokens, args.vocab, seed=100 * samples + rank)
        reduced.clear()
        with collect_layer_inputs(model.branched, model.context):
            forward_pass(model, data)
        layer_bytes = sum(reduced)
        reduced.clear()
        with collect_gate_moments(model.gates):
            forward_pass(model, data)
        results.append({"samples": samples, "layer_bytes": layer_bytes, "gate_bytes": sum(reduced)})
    dist.all_reduce = original
    if rank == 0:
        Path(out).write_text(json.dumps({"modules": len(model.branched), "results": results}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report_bytes(args: argparse.Namespace) -> None:
    """Part 1: spawn 2 gloo ranks and print bytes per target module for both data sizes."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "bytes.json")
        mp.spawn(_count_bytes, args=(2, _free_port(), args.sizes, args, out), nprocs=2, join=True)
        found = json.loads(Path(out).read_text())
    modules = found["modules"]
    d = args.hidden
    print(f"## bytes all-reduced per rank, 2 gloo ranks, {modules} target modules (d = {d})")
    print(f"{'samples (all ranks)':>20} {'per target module':>18} {'gate bank (3 moments)':>22}")
    for row in found["results"]:
        print(f"{row['samples']:>20} {row['layer_bytes'] / modules:>18,.0f} {row['gate_bytes']:>22,.0f}")
    h = MethodConfig(name="gainlora").gate.hidden
    print(f"# expected per module: 8 d^2 + 8 = {8 * d * d + 8:,} bytes (float64 sum and count), any sample count")
    print(f"# expected gate bank: 8 (2 d^2 + h^2) + 24 = {8 * (2 * d * d + h * h) + 24:,} bytes (h = {h})")


def report_time(args: argparse.Namespace) -> None:
    """Part 2: statistics pass and plain forward pass over one training epoch, on the same data."""
    print(f"## time, one process, batch {args.batch} x up to {args.tokens} tokens")
    for samples in args.sizes:
        model, params = gainlora_model(args.hidden, args.layers, args.vocab)
        optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
        data = batches(samples, args.batch, args.tokens, args.vocab, seed=samples)
        cases: dict[str, Callable[[], object]] = {
            "epoch": lambda: training_epoch(model, optimizer, data),
            "statistics": lambda: statistics_pass(model, data),
            "forward": lambda: forward_pass(model, data),
        }
        timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
        print(f"# {samples} samples")
        print_ratios(
            timings,
            [
                ("training epoch (reference)", "epoch", "epoch"),
                ("statistics pass / epoch", "statistics", "epoch"),
                ("no-grad forward / epoch", "forward", "epoch"),
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_llama_arguments(parser, hidden=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="padded length of a batch")
    parser.add_argument("--sizes", type=int, nargs=2, default=[32, 128], help="two data sizes (samples)")
    add_timing_arguments(parser, repeats=5)
    args = parser.parse_args()
    header("subspace pass: statistics traffic and time", args.threads)
    report_bytes(args)
    report_time(args)


if __name__ == "__main__":
    main()
