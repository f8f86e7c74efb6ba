"""GainLoRA: a branch method's branches, each scaled per sample by its task's gate.

Composition, not copying: the branches (growth, A design, penalties, layer bases) are an instance of
the configured branch method, to which every step delegates; this class adds the gates.

- grow: the branch method's branch plus a gate. Task t >= 1: the gate MLP starts as a copy of gate
  t-1's trained MLP (before_task, through gathered access).
- Key: k_t = top-1 left singular vector of (I - U2 U2^T) C3, C3 the second moment of the new gate's
  outputs on task t data, rescaled to norm sqrt(d/3).
- After every optimizer step the applied update of W1_t, W2_t, k_t is projected out of the old
  gate-input (U0), hidden (U1) and output (U2) subspaces, so g_t is unchanged on old inputs and k_t
  stays orthogonal to old gate outputs (within task 0 there is no basis, so nothing to project).
- After the task: U0, U1, U2 grow with the task's xbar, hidden activations and gate outputs.

The gate statistics ride on the branch method's own data passes (InfLoRA's design and basis passes),
and a pass of our own runs only when the branch method has none (O-LoRA, N-LoRA). With
`stats_modules_per_pass` the branch method repeats its pass over the same data; the gate moments
then sum identical passes, which leaves sum / count unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from cl_scale.distributed import ParamAccess
from cl_scale.errors import CLScaleError
from cl_scale.methods import BRANCH_NAMES, method_class
from cl_scale.methods.base import Method, TaskRunner
from cl_scale.methods.trainable import train_exactly
from cl_scale.modeling.gates import GateBank
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.recipe import MethodConfig
from cl_scale.subspace import Basis, GateMoments, collect_gate_moments

if TYPE_CHECKING:
    from cl_scale.modeling.context import BranchContext

BRANCH_METHODS: dict[str, type[Method]] = {name: method_class(name) for name in BRANCH_NAMES}
"""Methods GainLoRA can take its branches from (method.branch)."""

GATE_SPACES = ("input", "hidden", "output")
"""U0 (xbar, d), U1 (hidden activations, h), U2 (gate outputs, d); W1, W2 and the key move outside them."""

GATE_BASIS_PREFIX = "gate_basis."


class _PassCounter:
    """The trainer's runner, counting data passes so GainLoRA knows whether it needs a pass of its own."""

    def __init__(self, runner: TaskRunner) -> None:
        self.runner = runner
        self.task_index = runner.task_index
        self.num_tasks = runner.num_tasks
        self.access: ParamAccess = runner.access
        self.passes = 0

    def data_pass(self) -> None:
        self.passes += 1
        self.runner.data_pass()


class GainLoRA(Method):
    """Gated branches from a composed branch method, with gates updated outside old tasks' subspaces."""

    name = "gainlora"
    title = "GainLoRA"
    gated = True

    @classmethod
    def label(cls, config: MethodConfig) -> str:
        return f"{cls.title} ({BRANCH_METHODS[config.branch].label(config)})"

    @classmethod
    def trains_a(cls, config: MethodConfig) -> bool:
        return BRANCH_METHODS[config.branch].trains_a(config)

    @classmethod
    def gate_parameters(cls, config: MethodConfig, d_model: int) -> int:
        hidden = config.gate.hidden
        return hidden * d_model + d_model * hidden + d_model  # W1 h x d, W2 d x h, key d

    def __init__(self, config: MethodConfig, model: ContinualModel, num_tasks: int) -> None:
        super().__init__(config, model, num_tasks)
        if model.gates is None:
            raise CLScaleError(
                "GainLoRA needs a model with a gate bank", "build the model with gate_hidden (method.gate.hidden)"
            )
        if config.branch not in BRANCH_METHODS:
            raise CLScaleError(
                f"GainLoRA cannot take its branches from {config.branch!r}",
                f"set method.branch to one of {', '.join(BRANCH_METHODS)}",
            )
        self.gates: GateBank = model.gates
        self.branch_method: Method = BRANCH_METHODS[config.branch](config, model, num_tasks)
        self.bases: dict[str, Basis] = {}
        """The gate subspaces by name in GATE_SPACES, once the first task has ended."""
        self._before_step: list[torch.Tensor] | None = None

    def basis(self, space: str) -> Basis:
        """Gate subspace `space`, empty before the first task ends."""
        basis = self.bases.get(space)
        if basis is not None:
            return basis
        return Basis.empty(self.gates.hidden if space == "hidden" else self.gates.d_model)

    def grow(self, task_index: int, generator: torch.Generator) -> None:
        self.branch_method.grow(task_index, generator)
        index = self.model.add_gate(generator)
        if index != task_index:
            raise RuntimeError(f"task {task_index} would get gate {index}: grow every earlier task first")

    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        branch = self.branch_method.trainable_parameters(task_index)
        return train_exactly(self.model, branch + list(self.gates.gate(task_index)))

    def before_task(self, runner: TaskRunner) -> None:
        t = runner.task_index
        w1, w2, key = self.gates.gate(t)
        if t > 0:
            runner.access.write([w1, w2], runner.access.read(self.gates.gate(t - 1)[:2]))
        moments = self._with_gate_moments(self.branch_method.before_task, runner)
        direction = self.basis("output").leading_outside(moments.output.value(), 1)[:, 0]
        runner.access.write([key], [math.sqrt(self.gates.d_model / 3) * direction])

    def _with_gate_moments(self, step: Callable[[TaskRunner], None], runner: TaskRunner) -> GateMoments:
        """Run the branch method's `step` while the newest gate's moments collect (plus a pass if it had none)."""
        counter = _PassCounter(runner)
        with collect_gate_moments(self.gates) as moments:
            step(counter)
            if counter.passes == 0:
                runner.data_pass()
        return moments

    def loss(self, task_loss: torch.Tensor, context: BranchContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.branch_method.loss(task_loss, context)

    def before_step(self, runner: TaskRunner) -> None:
        self.branch_method.before_step(runner)
        if self.bases:
            self._before_step = runner.access.read(self.gates.gate(runner.task_index))

    def after_step(self, runner: TaskRunner) -> None:
        self.branch_method.after_step(runner)
        if self._before_step is None:
            return
        params = self.gates.gate(runner.task_index)
        after = runner.access.read(params)
        projected = [
            self._project(before, value, self.basis(space))
            for before, value, space in zip(self._before_step, after, GATE_SPACES, strict=True)
        ]
        runner.access.write(params, projected)
        self._before_step = None

    def _project(self, before: torch.Tensor, after: torch.Tensor, basis: Basis) -> torch.Tensor:
        """before + (after - before)(I - U U^T); [compat] rows rescaled to their post-step norms."""
        value = before + basis.project_out_rows(after - before)
        if not self.config.gate.restore_row_norm:
            return value
        scale = after.norm(dim=-1, keepdim=True) / value.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        return value * scale

    def after_task(self, runner: TaskRunner) -> None:
        moments = self._with_gate_moments(self.branch_method.after_task, runner)
        for space in GATE_SPACES:
            self.bases[space] = self.basis(space).extended(
                getattr(moments, space).value(),
                threshold=self.config.threshold,
                task_index=runner.task_index,
                num_tasks=runner.num_tasks,
                energy=self.config.energy,
            )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        gate = {GATE_BASIS_PREFIX + space: basis.vectors for space, basis in self.bases.items()}
        return {**self.branch_method.state_tensors(), **gate}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.branch_method.load_state_tensors(tensors)
        self.bases = {
            name[len(GATE_BASIS_PREFIX) :]: Basis(value.float().cpu())
            for name, value in tensors.items()
            if name.startswith(GATE_BASIS_PREFIX)
        }
