"""Branch scaling: forward + backward of a Llama decoder block with GainLoRA at 1, 5, 10, 15 tasks.

    python bench/branch_scaling.py                          # hidden 2048, sequence 256, batch 4
    python bench/branch_scaling.py --hidden 1024 --seq 128  # a reduced shape

Each task count gets its own block (same base weights) whose q and v projections carry that many
branches, and a gate bank with that many gates, trained as GainLoRA trains its newest task (InfLoRA
branches: B of the newest branch and the newest gate's W1, W2, key learn; everything else is frozen).
Two paths over the same parameters:

- fused: cl-scale's `BranchedLinear` and `GateBank` (stacked A / B, two products per layer);
- loop:  a per-branch and per-gate Python loop, written here only for the comparison.

Printed: median seconds per step and, per path, the paired ratio to 1 task of the same path; then
the loop path over the fused one at 1 and 15 tasks.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import add_device_argument, add_timing_arguments, header, interleaved, print_ratios
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from cl_scale.methods.trainable import train_exactly
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext
from cl_scale.modeling.gates import GateBank, gate_coefficient
from cl_scale.modeling.inject import inject_branches

TASK_COUNTS = (1, 5, 10, 15)
GATE_HIDDEN = 100


class LoopedBranches(nn.Module):
    """The same base and branches as a `BranchedLinear`, evaluated one branch at a time (benchmark only)."""

    def __init__(self, fused: BranchedLinear) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.fused
        result = layer.base(x)
        coefficients = layer.context.coefficients
        for index, (a, b) in enumerate(layer.branches()):
            update = F.linear(F.linear(x, a), b) * layer.scaling
            result = result + coefficients[:, index].view(-1, 1, 1) * update
        return result


def looped_gates(bank: GateBank, xbar: torch.Tensor) -> torch.Tensor:
    """GateBank's coefficients computed one gate at a time (benchmark only)."""
    columns = []
    for index in range(bank.num_gates):
        w1, w2, key = bank.gate(index)
        output = F.silu(F.linear(F.silu(F.linear(xbar, w1)), w2))
        columns.append(gate_coefficient(F.cosine_similarity(output, key.unsqueeze(0), dim=-1)))
    return torch.stack(columns, dim=1)


class GatedBlock:
    """One decoder block with `tasks` GainLoRA branches on q and v and a bank of `tasks` gates."""

    def __init__(self, base: LlamaDecoderLayer, tasks: int, rank: int, alpha: float, device: torch.device) -> None:
        self.block = copy.deepcopy(base)
        self.context = BranchContext()
        self.fused = inject_branches(
            self.block, kind="causal", rank=rank, alpha=alpha, dropout=0.0, context=self.context
        )
        self.looped = {path: LoopedBranches(layer) for path, layer in self.fused.items()}
        self.gates = GateBank(base.hidden_size, GATE_HIDDEN)
        generator = torch.Generator().manual_seed(tasks)
        for _ in range(tasks):
            self.gates.add_gate(generator)
            for layer in self.fused.values():
                index = layer.add_branch(generator)
                nn.init.normal_(layer.branch(index)[1], std=0.01, generator=generator)
        newest = tasks - 1
        trainable = [layer.branch(newest)[1] for layer in self.fused.values()] + list(self.gates.gate(newest))
        self.trainable = train_exactly(nn.ModuleList([self.block, self.gates]), trainable)
        self.block.to(device)  # in place: the looped views and `trainable` keep their parameters
        self.gates.to(device)

    def _use(self, modules: dict[str, nn.Module]) -> None:
        for path, module in modules.items():
            parent, _, child = path.rpartition(".")
            setattr(self.block.get_submodule(parent), child, module)

    def step(self, fused: bool, hidden: torch.Tensor, xbar: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> None:
        """Forward + backward of one batch (gradients of the trainable parameters are dropped after)."""
        self._use(self.fused if fused else self.looped)
        self.context.coefficients = self.gates(xbar) if fused else looped_gates(self.gates, xbar)
        output = self.block(hidden, position_embeddings=rope)
        output.float().pow(2).mean().backward()
        for param in self.trainable:
            param.grad = None


def llama_block(hidden: int, heads: int, intermediate: int) -> tuple[LlamaDecoderLayer, LlamaRotaryEmbedding]:
    """A Llama decoder block (SDPA attention, causal) and its rotary embedding, float32."""
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaDecoderLayer(config, layer_idx=0).requires_grad_(False), LlamaRotaryEmbedding(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=None, help="default: Llama's 2.6875 x hidden")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    add_timing_arguments(parser, repeats=5)
    add_device_argument(parser)
    args = parser.parse_args()
    header("branch scaling: Llama decoder block, GainLoRA on q and v, forward + backward", args.threads)
    intermediate = args.intermediate or int(args.hidden * 2.6875)
    print(
        f"# hidden {args.hidden}  heads {args.heads}  intermediate {intermediate}  sequence {args.seq}  "
        f"batch {args.batch}  r {args.rank}  gate hidden {GATE_HIDDEN}  float32"
    )
    base, rotary = llama_block(args.hidden, args.heads, intermediate)
    device = torch.device(args.device)
    hidden = torch.randn(args.batch, args.seq, args.hidden).to(device)
    xbar = torch.randn(args.batch, args.hidden).to(device)
    rope = rotary.to(device)(hidden, torch.arange(args.seq, device=device).unsqueeze(0))
    blocks = {tasks: GatedBlock(base, tasks, args.rank, args.alpha, device) for tasks in TASK_COUNTS}
    cases: dict[str, Callable[[], None]] = {}
    for path in ("fused", "loop"):
        for tasks, block in blocks.items():
            cases[f"{path}/{tasks}"] = lambda b=block, f=path == "fused": b.step(f, hidden, xbar, rope)
    timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
    most = TASK_COUNTS[-1]
    rows = [(f"{path} {tasks} tasks / 1 task", f"{path}/{tasks}", f"{path}/1") for path in ("fused", "loop")
            for tasks in TASK_COUNTS]
    rows += [(f"loop / fused, {tasks} task(s)", f"loop/{tasks}", f"fused/{tasks}") for tasks in (1, most)]
    print_ratios(timings, rows)

if __name__ == "__main__":
    main()
