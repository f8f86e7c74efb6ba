"""InfLoRA: each task's A is designed outside the input subspace of old tasks and frozen; only B trains.

Before task t, a no-grad pass over its data (old branches active, B_t = 0, so the new branch changes
nothing yet) gives every layer's input second moment C_t, and

    A_t = (1/sqrt(3)) * (top-r left singular vectors of (I - U U^T) C_t)^T

("random" design, [compat]: the branch's random A projected out of U, rows rescaled to 1/sqrt(3)).
After the task a fresh pass over the same data, now with the trained branch, gives the statistics
that extend U. A fresh pass rather than the pre-task statistic: the trained branch t changes the
inputs of every deeper layer, and what later tasks must stay away from is the inputs old-task data
produces in the model as it will stay from now on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cl_scale.errors import CLScaleError
from cl_scale.methods.base import TaskRunner
from cl_scale.methods.inclora import IncLoRA
from cl_scale.methods.trainable import branch_parameters, train_exactly
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.recipe import MethodConfig
from cl_scale.subspace import Basis, layer_statistics

DESIGNS = ("svd", "random")
ROW_NORM = 1.0 / math.sqrt(3.0)
"""Norm of every row of a designed A (the reference's scaling)."""

LAYER_BASIS_PREFIX = "basis."


class InfLoRA(IncLoRA):
    """IncLoRA with data-designed, frozen A's and one input basis per target layer."""

    name = "inflora"
    title = "InfLoRA"

    @classmethod
    def trains_a(cls, config: MethodConfig) -> bool:
        return False  # designed from data before the task, then frozen

    def __init__(self, config: MethodConfig, model: ContinualModel, num_tasks: int) -> None:
        super().__init__(config, model, num_tasks)
        if config.inflora.design not in DESIGNS:
            raise CLScaleError(
                f"unknown InfLoRA design {config.inflora.design!r}", f"use one of {', '.join(DESIGNS)}"
            )
        self.bases: dict[str, Basis] = {}
        """Per target layer (by module path): the input subspace of the tasks learned so far."""

    def basis(self, path: str) -> Basis:
        """The layer's basis, empty before the first task ends."""
        basis = self.bases.get(path)
        return basis if basis is not None else Basis.empty(self.model.branched[path].in_features)

    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        return train_exactly(self.model, branch_parameters(self.model, task_index, with_a=False))

    def before_task(self, runner: TaskRunner) -> None:
        if self.config.inflora.design == "svd":
            self._design_from_data(runner)
        else:
            self._design_at_random(runner)

    def _design_from_data(self, runner: TaskRunner) -> None:
        layers = self.model.branched
        statistics = layer_statistics(
            layers, self.model.context, runner.data_pass, self.config.stats_modules_per_pass
        )
        for path, c in statistics:
            directions = self.basis(path).leading_outside(c, layers[path].rank)
            runner.access.write([layers[path].branch(runner.task_index)[0]], [ROW_NORM * directions.T])

    def _design_at_random(self, runner: TaskRunner) -> None:
        paths = list(self.model.branched)
        params = [self.model.branched[path].branch(runner.task_index)[0] for path in paths]
        values = []
        for path, a in zip(paths, runner.access.read(params), strict=True):
            basis = self.basis(path)
            basis.require_room(a.shape[0])
            rows = basis.project_out_rows(a.double())
            values.append(ROW_NORM * rows / rows.norm(dim=1, keepdim=True))
        runner.access.write(params, values)

    def after_task(self, runner: TaskRunner) -> None:
        super().after_task(runner)
        statistics = layer_statistics(
            self.model.branched, self.model.context, runner.data_pass, self.config.stats_modules_per_pass
        )
        for path, c in statistics:
            self.bases[path] = self.basis(path).extended(
                c,
                threshold=self.config.threshold,
                task_index=runner.task_index,
                num_tasks=runner.num_tasks,
                energy=self.config.energy,
            )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {LAYER_BASIS_PREFIX + path: basis.vectors for path, basis in self.bases.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bases = {
            name[len(LAYER_BASIS_PREFIX) :]: Basis(value.float().cpu())
            for name, value in tensors.items()
            if name.startswith(LAYER_BASIS_PREFIX)
        }
