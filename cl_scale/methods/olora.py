"""O-LoRA: IncLoRA plus a penalty pushing the new A's rows away from every old A's rows.

    lambda_1 sum_{i<t} ||A_i A_t^T||_1  ("olora_orth")   +   lambda_2 (||A_t||_F + ||B_t||_F)  ("olora_l2")

summed over target layers by the layers themselves (the penalty runs inside each layer's forward).
"""

from __future__ import annotations

from functools import partial

import torch

from cl_scale.methods.inclora import IncLoRA
from cl_scale.methods.penalty import with_eager_gradient
from cl_scale.modeling.branched_linear import BranchedLinear, PenaltyFn


def _orthogonality(current: torch.Tensor, *old: torch.Tensor) -> torch.Tensor:
    return (torch.cat(old).float() @ current.float().T).abs().sum()


def _norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(a.float()) + torch.linalg.matrix_norm(b.float())


def olora_penalty(
    layer: BranchedLinear,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    *,
    task: int,
    lambda_orth: float,
    lambda_l2: float,
) -> dict[str, torch.Tensor]:
    """Both O-LoRA terms of one layer while task `task` trains; the orthogonality term is 0 on task 0."""
    a, b = a_list[task], b_list[task]
    old = a_list[:task]
    orth = with_eager_gradient(_orthogonality, a, *old) if old else a.new_zeros((), dtype=torch.float32)
    return {"olora_orth": lambda_orth * orth, "olora_l2": lambda_l2 * with_eager_gradient(_norms, a, b)}


class OLoRA(IncLoRA):
    """IncLoRA whose layers carry the O-LoRA penalty while a task trains."""

    name = "olora"
    title = "O-LoRA"

    def penalty(self, task_index: int) -> PenaltyFn:
        return partial(
            olora_penalty,
            task=task_index,
            lambda_orth=self.config.olora.lambda_orth,
            lambda_l2=self.config.olora.lambda_l2,
        )
