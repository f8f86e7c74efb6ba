"""N-LoRA: IncLoRA plus an L1 penalty making each task's update sparse, so tasks collide less.

    "update" (default):  lambda sum_layers ||s B_t A_t||_1        (the paper: the task's update Delta W)
    "compat":            lambda sum_layers ||A_t B_t||_1          (the public code: an r x r product,
                                                                    only defined for square layers)
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from cl_scale.errors import CLScaleError
from cl_scale.methods.inclora import IncLoRA
from cl_scale.methods.penalty import with_eager_gradient
from cl_scale.modeling.branched_linear import BranchedLinear, PenaltyFn
from cl_scale.modeling.wrapper import ContinualModel

if TYPE_CHECKING:
    from cl_scale.recipe import MethodConfig

VARIANTS = ("update", "compat")


def _update_l1(a: torch.Tensor, b: torch.Tensor, *, scaling: float) -> torch.Tensor:
    return (scaling * (b.float() @ a.float())).abs().sum()


def _compat_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() @ b.float()).abs().sum()


def nlora_penalty(
    layer: BranchedLinear,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    *,
    task: int,
    lambda_l1: float,
    variant: str,
) -> dict[str, torch.Tensor]:
    """The N-LoRA term ("nlora_l1") of one layer while task `task` trains."""
    l1 = partial(_update_l1, scaling=layer.scaling) if variant == "update" else _compat_l1
    return {"nlora_l1": lambda_l1 * with_eager_gradient(l1, a_list[task], b_list[task])}


class NLoRA(IncLoRA):
    """IncLoRA whose layers carry the N-LoRA sparsity penalty while a task trains."""

    name = "nlora"
    title = "N-LoRA"

    def __init__(self, config: MethodConfig, model: ContinualModel, num_tasks: int) -> None:
        super().__init__(config, model, num_tasks)
        variant = config.nlora.variant
        if variant not in VARIANTS:
            raise CLScaleError(f"unknown N-LoRA variant {variant!r}", f"use one of {', '.join(VARIANTS)}")
        non_square = [path for path, layer in model.branched.items() if layer.in_features != layer.out_features]
        if variant == "compat" and non_square:
            raise CLScaleError(
                f"the compat N-LoRA penalty multiplies A (r x d_in) by B (d_out x r), which needs square layers; "
                f"{len(non_square)} target layers are not, e.g. {non_square[0]}",
                "use method.nlora.variant=update, or target only square layers (model.target_modules)",
            )

    def penalty(self, task_index: int) -> PenaltyFn:
        return partial(
            nlora_penalty,
            task=task_index,
            lambda_l1=self.config.nlora.lambda_l1,
            variant=self.config.nlora.variant,
        )
