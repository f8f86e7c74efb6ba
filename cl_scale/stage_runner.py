"""The TaskRunner a method sees while one task is learned (see cl_scale.methods.base).

One implementation for the trainer (a DeepSpeed engine over this rank's shard of the task's rows), the
benchmarks and the method tests (a plain model over a few batches): methods then run the same data
passes everywhere, through `distributed.no_grad_pass`, which restarts ZeRO-3's trace around each one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from cl_scale.distributed import ParamAccess, no_grad_pass

if TYPE_CHECKING:
    from cl_scale.data.pipeline import TaskRows

Batch = dict[str, torch.Tensor]


@dataclass
class StageRunner:
    """Task `task_index` of `num_tasks`: gathered parameter access and no-grad passes over `batches`."""

    task_index: int
    num_tasks: int
    access: ParamAccess
    model: nn.Module
    """The DeepSpeed engine that owns the continual model, or the continual model itself."""
    batches: Iterable[Batch]
    """Re-iterable: every data pass walks it from the start (the same batch count on every rank)."""
    passes: int = field(default=0, init=False)
    """Data passes run so far (methods promise a fixed number per task)."""

    def data_pass(self) -> None:
        """One no-grad forward over every batch."""
        self.passes += 1
        with no_grad_pass(self.model) as module:
            for batch in self.batches:
                module(**batch)


@dataclass(frozen=True)
class ShardBatches:
    """This rank's shard of a task's rows as batches, collated afresh on every pass (so passes can repeat)."""

    rows: TaskRows
    shards: list[list[int]]

    def __iter__(self) -> Iterator[Batch]:
        return (self.rows.batch(indices) for indices in self.shards)
