"""A frozen linear layer plus one LoRA branch per task, all evaluated with two fused products.

    y = W x + B [s c ⊙ (A x)]      A = [A_1; ...; A_n] (n r × d_in), B = [B_1 ... B_n] (d_out × n r)

where `c` repeats each task's coefficient over that task's `r` rank rows (without coefficients,
y = W x + s B A x as in PEFT). The layer stays a drop-in
`nn.Module` (PEFT style): it keeps the wrapped layer's `in_features`, `out_features` and `weight`.
Branch parameters are direct parameters of this module (`lora_A_<i>`, `lora_B_<i>`), so ZeRO-3's
pre-forward hook gathers all of them whenever the layer runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cl_scale.modeling.context import BranchContext

PenaltyFn = Callable[["BranchedLinear", list[torch.Tensor], list[torch.Tensor]], dict[str, torch.Tensor]]
"""Computes loss terms from a layer's (gathered) A and B lists; called inside the forward while training."""


class BranchedLinear(nn.Module):
    """A frozen `nn.Linear` with stacked per-task LoRA branches scaled by per-sample coefficients."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        context: BranchContext,
        stream: str = "source",
    ) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.context = context
        self.stream = stream
        """Which token mask of the context covers this layer's input ("source" or "target")."""
        self.num_branches = 0
        self.penalty: PenaltyFn | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    def branch(self, index: int) -> tuple[nn.Parameter, nn.Parameter]:
        """The (A, B) parameters of branch `index`."""
        return getattr(self, f"lora_A_{index}"), getattr(self, f"lora_B_{index}")

    def branches(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """All (A, B) pairs, oldest first."""
        return [self.branch(i) for i in range(self.num_branches)]

    def add_branch(self, generator: torch.Generator | None = None) -> int:
        """Append a branch: A Kaiming-uniform like PEFT's default, B zero, so the output is unchanged.

        Pass a seeded `generator` so every rank creates the same values.
        """
        weight = self.base.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        a = torch.empty(self.rank, self.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in
        a.uniform_(-bound, bound, generator=generator)
        b = torch.zeros(self.out_features, self.rank, dtype=torch.float32)
        index = self.num_branches
        device = weight.device
        self.register_parameter(f"lora_A_{index}", nn.Parameter(a.to(device=device, dtype=dtype)))
        self.register_parameter(f"lora_B_{index}", nn.Parameter(b.to(device=device, dtype=dtype)))
        self.num_branches += 1
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.num_branches == 0:
            return result
        pairs = self.branches()
        if self.training and self.penalty is not None:
            for name, value in self.penalty(self, [a for a, _ in pairs], [b for _, b in pairs]).items():
                self.context.add_penalty(name, value)
        a_stack, b_stack = self._stacked(pairs)
        hidden = F.linear(self.dropout(x).to(a_stack.dtype), a_stack)
        if self.context.coefficients is None:
            update = F.linear(hidden, b_stack) * self.scaling
        else:  # s c ⊙ (A x): the context expands and scales the coefficients once for every layer
            scale = self.context.rank_coefficients(self.rank, self.scaling, hidden.dtype)
            shape = (scale.shape[0],) + (1,) * (hidden.dim() - 2) + (scale.shape[1],)
            update = F.linear(hidden * scale.view(shape), b_stack)
        return result + update.to(result.dtype)

    def _stacked(self, pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (n r × d_in) and B (d_out × n r) of all branches, taken from the context during a generation."""
        stacks = self.context.stacks
        if stacks is not None and id(self) in stacks:
            return stacks[id(self)]
        a_stack = pairs[0][0] if len(pairs) == 1 else torch.cat([a for a, _ in pairs], dim=0)
        b_stack = pairs[0][1] if len(pairs) == 1 else torch.cat([b for _, b in pairs], dim=1)
        if stacks is not None:
            stacks[id(self)] = (a_stack, b_stack)
        return a_stack, b_stack

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, branches={self.num_branches}, stream={self.stream}"
