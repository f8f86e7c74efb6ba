"""IncLoRA: a new branch per task, all summed with coefficient 1, old branches frozen."""

from __future__ import annotations

import torch
from torch import nn

from cl_scale.methods.base import Method, TaskRunner
from cl_scale.methods.trainable import branch_parameters, train_exactly
from cl_scale.modeling.branched_linear import PenaltyFn


class IncLoRA(Method):
    """Task t owns branch t; its A and B train. The base of the other branch-expansion methods.

    A subclass with an extra loss returns it from `penalty`; it is installed on every layer when the
    task begins training (layers compute it inside their forward) and removed after the task.
    """

    name = "inclora"
    title = "IncLoRA"

    def penalty(self, task_index: int) -> PenaltyFn | None:
        """The layer penalty while `task_index` trains (None: the task loss alone)."""
        return None

    def grow(self, task_index: int, generator: torch.Generator) -> None:
        index = self.model.add_branches(generator)
        if index != task_index:
            raise RuntimeError(f"task {task_index} would get branch {index}: grow every earlier task first")

    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        """Task `task_index` begins training: its branch trains and its penalty is installed until `after_task`.

        Not in `grow`: restoring finished stages grows them without training them, and must leave no
        finished task's penalty on the layers.
        """
        penalty = self.penalty(task_index)
        for layer in self.model.branched.values():
            layer.penalty = penalty
        return train_exactly(self.model, branch_parameters(self.model, task_index))

    def after_task(self, runner: TaskRunner) -> None:
        for layer in self.model.branched.values():
            layer.penalty = None
