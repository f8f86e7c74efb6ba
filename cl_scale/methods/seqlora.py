"""SeqLoRA, the lower bound: one branch, created for the first task and trained again on every task."""

from __future__ import annotations

import torch
from torch import nn

from cl_scale.methods.base import Method
from cl_scale.methods.trainable import branch_parameters, train_exactly


class SeqLoRA(Method):
    """One shared branch; no memory of old tasks (so stages need their own snapshots)."""

    name = "seqlora"
    title = "SeqLoRA"
    grows_branch = False

    def grow(self, task_index: int, generator: torch.Generator) -> None:
        if self.model.num_branches == 0:
            self.model.add_branches(generator)

    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        return train_exactly(self.model, branch_parameters(self.model, 0))
