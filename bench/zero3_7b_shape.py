"""ZeRO-3 at the Llama-2-7B shape: build, two GainLoRA tasks, training steps, one snapshot.

    deepspeed --num_gpus 2 bench/zero3_7b_shape.py [--json result.json] [--before-task] [--gradient-checkpointing]
    deepspeed --num_gpus 2 bench/zero3_7b_shape.py --every-module ...   # without block leaves: what they cost
    python bench/zero3_7b_shape.py --reuse-distance 1e9 --before-task      # one GPU, shipped reuse distance

Runs on whatever accelerator DeepSpeed finds: CPU ranks (gloo) on a machine without a GPU, one rank
per GPU (NCCL) otherwise; on a GPU it also reports the CUDA allocator's peak per phase.

Random bf16 weights, built partitioned from the first byte (transformers' ZeRO-3 integration object
exists before `from_config`, so the model is constructed under `deepspeed.zero.Init`); no download.
Recipe, DeepSpeed config and method come from the shipped `recipes/llama7b_order1.yaml` (GainLoRA
with InfLoRA branches, ds_configs/zero3.json) with r = 8, one sample per rank, InfLoRA's random design,
and one change to the DeepSpeed config: `--reuse-distance` (default 1e8) replaces zero3.json's 1e9 for
`stage3_max_reuse_distance` and `stage3_max_live_parameters`. 1e9 keeps up to a billion gathered
parameters per rank for reuse in the backward (an 8-layer run measured +1.8 GB per rank from the
second step on): right beside 80 GB GPUs, but on two CPU ranks sharing 24 GB it is 13% of the full
copy on top of each rank's half (`--reuse-distance 1e9` measures the shipped value).

Stage 1 is set up as a resumed run would be: both tasks' branches and gates are grown and the state
of the end of task 0 (its gate and layer bases) is loaded, here random orthonormal bases. Then task 1
runs as the trainer runs it: with `--before-task`, the method's `before_task` (gate 1 copies gate 0's
MLP, one no-grad data pass designs its key, A_1 is drawn outside the layer bases: all gathered reads
and writes; the key design decomposes a dense d x d float64 matrix, about 1.5 GB at d = 4096, hence
opt-in on a 24 GB machine); training steps with the update projection (`before_step` / `after_step`
through `ZeroAccess`); and the stage snapshot (`ZeroAccess.read` of every branch and gate parameter).
Two steps, because B_1 starts at zero: the first step cannot move gate 1 (its coefficient scales a
zero branch), the second does, and its update must stay outside the old gate subspaces.

Reported per rank: peak resident memory of each phase, against one full bf16 copy of the base
(2 bytes x parameters), and its wall and CPU time; the trainable count; how far the applied gate
update strays into the old subspaces (must be ~0); whether every rank read the same snapshot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import deepspeed
import torch
from common import peak_rss_bytes, reset_peak_rss
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from cl_scale import distributed as dist_utils
from cl_scale.cli import strip_local_rank
from cl_scale.continual_state import stage_generator
from cl_scale.distributed import ZeroAccess
from cl_scale.ds_config import build_ds_config
from cl_scale.methods import build_method
from cl_scale.methods.gainlora import GATE_SPACES, GainLoRA
from cl_scale.modeling.wrapper import IGNORE_INDEX, ContinualModel
from cl_scale.plan import PUBLIC_MODELS
from cl_scale.recipe import load_recipe
from cl_scale.stage_runner import StageRunner

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama7b_order1.yaml"
OLD_DIRECTIONS = 16
"""Columns of each synthetic end-of-task-0 basis."""


def short_batch(tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One sample: a prompt of `tokens // 2` random ids, then the answer the loss covers."""
    ids = torch.randint(3, 32000, (1, tokens), generator=torch.Generator().manual_seed(seed))
    prompt = torch.zeros_like(ids)
    prompt[:, : tokens // 2] = 1
    labels = ids.masked_fill(prompt == 1, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": prompt, "labels": labels}


def random_basis(dim: int, generator: torch.Generator) -> torch.Tensor:
    """OLD_DIRECTIONS orthonormal columns, the same on every rank."""
    q, _ = torch.linalg.qr(torch.randn(dim, OLD_DIRECTIONS, generator=generator, dtype=torch.float64))
    return q.float()


def end_of_task0_state(model: ContinualModel) -> dict[str, torch.Tensor]:
    """Method state tensors as task 0 would leave them: a basis per target layer and per gate space."""
    generator = torch.Generator().manual_seed(0)
    assert model.gates is not None
    state = {f"basis.{path}": random_basis(layer.in_features, generator) for path, layer in model.branched.items()}
    dims = {"input": model.gates.d_model, "hidden": model.gates.hidden, "output": model.gates.d_model}
    state.update({f"gate_basis.{space}": random_basis(dims[space], generator) for space in GATE_SPACES})
    return state


def gate_update(method: GainLoRA, before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    """For gate 1's W1, W2, key: the largest |Delta U| / |Delta| (the applied update's share inside the
    old subspaces, ~0 when the projection works) and the smallest |Delta| / |before| (it did move)."""
    inside, moved = 0.0, float("inf")
    for old, new, space in zip(before, after, GATE_SPACES, strict=True):
        delta = (new - old).double()
        inside = max(inside, float((delta @ method.basis(space).vectors.double()).norm() / delta.norm()))
        moved = min(moved, float(delta.norm() / old.double().norm()))
    return inside, moved


class Phases:
    """Wall time, this rank's CPU time and peak memory of each phase (peak windows restart per phase):
    resident memory, and on a GPU also the peak the CUDA allocator handed out.

    CPU time is the steadier figure on a shared machine: wall time grows with other processes' load.
    """

    def __init__(self) -> None:
        self.cuda = dist_utils.accelerator_device().type == "cuda"
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.peak_rss_bytes: dict[str, int] = {}
        self.peak_gpu_bytes: dict[str, int] = {}
        self._restart()

    def _restart(self) -> None:
        reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = (time.perf_counter(), time.process_time())

    def end(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gpu_bytes[name] = torch.cuda.max_memory_allocated()
        self.seconds[name] = time.perf_counter() - self._start[0]
        self.cpu_seconds[name] = time.process_time() - self._start[1]
        self.peak_rss_bytes[name] = peak_rss_bytes()
        if dist_utils.is_main():
            peak = self.peak_rss_bytes[name] / 1e9
            gpu = f", GPU peak {self.peak_gpu_bytes[name] / 1e9:.2f} GB" if self.cuda else ""
            print(f"{name}: {self.seconds[name]:.1f} s, peak resident {peak:.2f} GB{gpu}", flush=True)
        self._restart()


def train_step(engine: object, method: GainLoRA, model: ContinualModel, runner: StageRunner) -> float:
    """One optimizer step as the trainer makes it, with the update projection around it; returns the loss."""
    (batch,) = runner.batches
    output = engine(**batch)
    loss, _ = method.loss(output.loss, model.context)
    engine.backward(loss)
    method.before_step(runner)
    engine.step()
    method.after_step(runner)
    return float(loss.detach())


@dataclass
class Stage:
    """Task 1, ready to train."""

    engine: object
    method: GainLoRA
    model: ContinualModel
    runner: StageRunner
    counts: dict[str, int]
    zero3_handle: HfDeepSpeedConfig
    """Keeps transformers' ZeRO-3 integration switched on while the model is in use."""


def build(args: argparse.Namespace, phases: Phases) -> Stage:
    """The partitioned base, both tasks grown, task 0's end state loaded, task 1's engine."""
    world = dist_utils.world_size()
    zero = "deepspeed.overrides.zero_optimization"
    overrides = [
        f"method.rank={args.rank}",
        "method.inflora.design=random",
        "train.per_device_batch=1",
        f"train.global_batch={world}",
        f"{zero}.stage3_max_reuse_distance={int(args.reuse_distance)}",
        f"{zero}.stage3_max_live_parameters={int(args.reuse_distance)}",
    ]
    if args.gradient_checkpointing:
        overrides.append("train.gradient_checkpointing=true")
    recipe = load_recipe(RECIPE, overrides)
    ds_config = build_ds_config(recipe, world)
    zero3_handle = HfDeepSpeedConfig(ds_config)  # must exist before the model is built
    config = replace(PUBLIC_MODELS[recipe.model.path], layers=args.layers).config()  # Llama-2-7B, --layers deep
    config.pad_token_id = recipe.model.pad_token_id
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    base_parameters = sum(p.ds_numel for p in base.parameters())  # before the branches join base's modules
    phases.end("build")
    model = ContinualModel(
        base,
        kind="causal",
        target_modules=recipe.model.target_modules,
        rank=recipe.method.rank,
        alpha=recipe.method.alpha,
        dropout=recipe.method.dropout,
        gate_hidden=recipe.method.gate.hidden,
    )
    if recipe.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    method = build_method(recipe.method, model, num_tasks=2)
    assert isinstance(method, GainLoRA)
    for task in (0, 1):
        method.grow(task, stage_generator(recipe, task))
    method.load_state_tensors(end_of_task0_state(model))
    trainable = method.trainable_parameters(1)
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    if not args.every_module:
        dist_utils.zero3_block_leaves(model)  # as distributed.deepspeed_engine does before every ZeRO-3 engine
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    batch = {k: v.to(dist_utils.accelerator_device()) for k, v in short_batch(args.tokens, dist_utils.rank()).items()}
    runner = StageRunner(1, 2, ZeroAccess(), engine, [batch])
    counts = {
        "base_parameters": base_parameters,
        "trainable_parameters": sum(p.ds_numel for p in trainable),
    }
    phases.end("initialize")
    return Stage(engine, method, model, runner, counts, zero3_handle)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="sequence length of the one sample per rank")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (fewer: a quick check of the script)")
    parser.add_argument(
        "--reuse-distance", type=float, default=1e8, help="stage3_max_reuse_distance and _max_live_parameters"
    )
    parser.add_argument("--before-task", action="store_true", help="also run the method's before_task")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing=true (as the trainer applies it)"
    )
    parser.add_argument(
        "--every-module", action="store_true",
        help="no block leaves: ZeRO-3 hooks and gathers module by module (what the leaves cost in memory)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (rank 0)")
    args = parser.parse_args(argv)
    if dist_utils.accelerator_device().type == "cpu":
        torch.set_num_threads(1)  # two CPU ranks share two cores
    phases = Phases()
    dist_utils.init_distributed(timeout_s=1800)
    stage = build(args, phases)
    engine, method, model, runner = stage.engine, stage.method, stage.model, stage.runner

    if args.before_task:
        method.before_task(runner)
        phases.end("before_task")

    gate = model.gates.gate(1)
    engine.train()
    dist_utils.restart_zero_trace(engine)
    losses = [train_step(engine, method, model, runner)]
    phases.end("step_1")
    before = runner.access.read(gate)
    losses.append(train_step(engine, method, model, runner))
    inside, moved = gate_update(method, before, runner.access.read(gate))
    phases.end("step_2")

    params = model.branch_parameters()
    snapshot = runner.access.read([params[name] for name in sorted(params)])
    checksum = float(sum(value.double().sum() for value in snapshot))
    phases.end("snapshot")

    world = dist_utils.world_size()
    mine = {
        "peak_rss_bytes": phases.peak_rss_bytes,
        "peak_gpu_bytes": phases.peak_gpu_bytes,
        "cpu_seconds": phases.cpu_seconds,
        "checksum": checksum,
    }
    per_rank = dist_utils.all_gather_object(mine)
    result = {
        "world_size": world,
        "accelerator": dist_utils.accelerator_description(),
        **stage.counts,
        "full_bf16_copy_bytes": 2 * stage.counts["base_parameters"],
        "snapshot_tensors": len(snapshot),
        "snapshot_parameters": sum(value.numel() for value in snapshot),
        "losses": losses,
        "gate_update_inside_old_subspaces": inside,
        "gate_update_relative_size": moved,
        "snapshot_same_on_every_rank": len({r["checksum"] for r in per_rank}) == 1,
        "seconds": phases.seconds,
        "ranks": per_rank,
    }
    if dist_utils.is_main():
        report(result)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2))
    engine.destroy()
    dist_utils.shutdown_distributed()


def report(result: dict) -> None:
    """Rank 0 prints the figures."""
    full = result["full_bf16_copy_bytes"]
    device = result["accelerator"]
    print(f"# ZeRO-3, Llama-2-7B shape, {result['world_size']} rank(s) on {device['name']} ({device['backend']}), "
          f"bf16, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"base parameters {result['base_parameters']:,}  full bf16 copy {full / 1e9:.2f} GB")
    print(f"trainable parameters (task 1) {result['trainable_parameters']:,}")
    print(f"snapshot {result['snapshot_tensors']} tensors, {result['snapshot_parameters']:,} values, "
          f"same on every rank: {result['snapshot_same_on_every_rank']}")
    losses = ", ".join(f"{x:.3f}" for x in result["losses"])
    print(f"losses {losses}  gate-1 update: inside old subspaces {result['gate_update_inside_old_subspaces']:.1e} "
          f"of its norm, size {result['gate_update_relative_size']:.1e} of the weights")
    print("wall seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    for index, rank in enumerate(result["ranks"]):
        print(f"rank {index} CPU seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in rank["cpu_seconds"].items()))
    for index, rank in enumerate(result["ranks"]):
        peaks = rank["peak_rss_bytes"]
        line = "  ".join(f"{k} {v / 1e9:.2f} GB ({v / full:.0%})" for k, v in peaks.items())
        top = max(peaks.values())
        print(f"rank {index} peak resident {top / 1e9:.2f} GB = {top / full:.1%} of the full copy; by phase: {line}")
        if rank["peak_gpu_bytes"]:
            gpu = "  ".join(f"{k} {v / 1e9:.2f} GB" for k, v in rank["peak_gpu_bytes"].items())
            print(f"rank {index} GPU peak allocated by phase: {gpu}")


if __name__ == "__main__":
    main(strip_local_rank(sys.argv[1:])[0])
