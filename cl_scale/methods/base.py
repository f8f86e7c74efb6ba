"""The small interface every continual-learning method implements, so the trainer never branches on names.

A task's life cycle, as the trainer drives it:

    method.grow(task, generator)          # add this task's branch / gate (plain tensors, same on every rank)
    params = method.trainable_parameters(task)   # and freeze everything else
    ... the trainer builds the DeepSpeed engine around the model ...
    method.before_task(runner)            # data passes and gathered writes (InfLoRA's A, GainLoRA's key)
    for each optimizer step:
        loss, terms = method.loss(task_loss, model.context)
        method.before_step(runner); engine.step(); method.after_step(runner)
    method.after_task(runner)             # extend subspace bases
    snapshot: model branch/gate values + method.state_tensors()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from cl_scale.distributed import ParamAccess

if TYPE_CHECKING:
    from cl_scale.modeling.context import BranchContext
    from cl_scale.modeling.wrapper import ContinualModel
    from cl_scale.recipe import MethodConfig


class TaskRunner(Protocol):
    """What the trainer offers a method while one task is being learned."""

    task_index: int
    """0-based index of the task being learned."""
    num_tasks: int
    """Length of the recipe's task order (T in the threshold schedule)."""
    access: ParamAccess
    """Gathered reads/writes of parameters outside a forward."""

    def data_pass(self) -> None:
        """One no-grad forward pass of the model over this rank's shard of the task's training data."""


class Method(ABC):
    """Base class: defaults are those of a method with no data passes, no penalty and no projection."""

    name: str = ""
    title: str = ""
    """How reports and the demo name the method."""
    gated: bool = False
    """Whether the model needs a gate bank: one gate per task, scaling that task's branch per sample."""
    grows_branch: bool = True
    """Whether every task gets a branch of its own (SeqLoRA trains one branch again on every task)."""

    @classmethod
    def label(cls, config: MethodConfig) -> str:
        """The method's name in tables and figures."""
        return cls.title

    @classmethod
    def trains_a(cls, config: MethodConfig) -> bool:
        """Whether a branch's A (r x d_in) trains; B (d_out x r) always does."""
        return True

    @classmethod
    def branch_parameters_per_layer(cls, config: MethodConfig, d_in: int, d_out: int) -> tuple[int, int]:
        """(added, trained) parameters of one task's branch on one d_in -> d_out target layer."""
        a, b = config.rank * d_in, d_out * config.rank
        return a + b, (a if cls.trains_a(config) else 0) + b

    @classmethod
    def gate_parameters(cls, config: MethodConfig, d_model: int) -> int:
        """Parameters of one task's gate (all of them train in that task); 0 without gates."""
        return 0

    def __init__(self, config: MethodConfig, model: ContinualModel, num_tasks: int) -> None:
        self.config = config
        self.model = model
        self.num_tasks = num_tasks

    @abstractmethod
    def grow(self, task_index: int, generator: torch.Generator) -> None:
        """Add (or reuse) the branch and gate of task `task_index` before the engine is built."""

    @abstractmethod
    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        """Set requires_grad so that exactly the returned parameters train in this task."""

    def before_task(self, runner: TaskRunner) -> None:
        """Data passes and gathered initialisation once the engine exists."""

    def loss(self, task_loss: torch.Tensor, context: BranchContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and every term separately (task loss plus the penalties layers added in forward)."""
        terms = {"task": task_loss, **context.penalties}
        total = task_loss
        for value in context.penalties.values():
            total = total + value.to(total.dtype)
        return total, terms

    def before_step(self, runner: TaskRunner) -> None:
        """Called right before an optimizer step is applied."""

    def after_step(self, runner: TaskRunner) -> None:
        """Called right after an optimizer step is applied."""

    def after_task(self, runner: TaskRunner) -> None:
        """Called once the task's training is done (e.g. extend subspace bases)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Method state beyond the model's parameters (e.g. subspace bases), with stable names."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned."""
