"""GainLoRA gate coefficients of a trained model on given prompts, without a task id.

Every rank runs every batch: the gate bank is tiny next to generation, and under ZeRO-3 the embedding and
the gate bank gather their partitions collectively in their forwards, so all ranks must call them equally
often. The result is then the same on every rank without a gather.
"""

from __future__ import annotations

from typing import Any

import torch


def is_gated(model: Any) -> bool:
    """True when the model has at least one gate (GainLoRA)."""
    return model.gates is not None and model.gates.num_gates > 0


def gate_coefficients(model: Any, rows: Any, *, batch_size: int) -> torch.Tensor:
    """(examples, gates) coefficient of every gate on every row of `rows` (a TaskRows), in row order."""
    total = len(rows.rows)
    parts = []
    with torch.no_grad():
        for start in range(0, total, batch_size):
            batch = rows.batch(list(range(start, min(total, start + batch_size))))
            xbar = model.gate_input(batch["input_ids"], batch["prompt_mask"])
            parts.append(model.gates(xbar).float().cpu())
    return torch.cat(parts)
