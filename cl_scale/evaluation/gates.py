"""GainLoRA gate coefficients of a trained model on given prompts, without a task id.

Every rank runs every batch: the gate bank is tiny next to generation, and under ZeRO-3 the embedding and
the gate bank gather their partitions collectively in their forwards, so all ranks must call them equally
often. The result is then the same on every rank without a gather.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from cl_scale.distributed import no_grad_pass

if TYPE_CHECKING:
    from cl_scale.data.pipeline import TaskRows
    from cl_scale.modeling.wrapper import ContinualModel


def is_gated(model: ContinualModel) -> bool:
    """True when the model has at least one gate (GainLoRA)."""
    return model.gates is not None and model.gates.num_gates > 0


def gate_coefficients(model: nn.Module, rows: TaskRows, *, batch_size: int) -> torch.Tensor:
    """(examples, gates) coefficient of every gate on every row of `rows` (a TaskRows), in row order.

    `model` is the engine that owns the continual model, or the model itself on one device. The embedding
    and gate bank run alone, in an order no training step has, hence the no-grad pass's trace restart.
    """
    total = len(rows.rows)
    parts = []
    with no_grad_pass(model) as continual:
        for start in range(0, total, batch_size):
            batch = rows.batch(list(range(start, min(total, start + batch_size))))
            xbar = continual.gate_input(batch["input_ids"], batch["prompt_mask"])
            parts.append(continual.gates(xbar).float().cpu())
    return torch.cat(parts)
