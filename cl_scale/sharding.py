"""Which examples each rank processes, chosen so 1 rank and N ranks see the same global batches.

Training: an epoch is a seeded permutation cut into global batches; each global batch is cut into
micro-batches of `per_device_batch`, and micro-batch `a * world + rank` is the `a`-th accumulation
step of `rank`. One rank with `world` times the accumulation steps therefore computes exactly the same
micro-batch losses as `world` ranks do, which is what makes their loss curves agree; and as the trainer
weights each micro-batch by its share of the step's loss tokens (`step_micro_batches` gives every rank
the whole step), the step's loss is the mean over the global batch's tokens however it is split.

Data passes and evaluation: every rank gets the SAME number of batches (ZeRO-3 forwards are
collective, so a rank with one batch fewer would hang the others), sizes differing by at most one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch

from cl_scale.errors import CLScaleError

T = TypeVar("T")


def step_micro_batches(
    num_examples: int, *, global_batch: int, per_device_batch: int, epoch: int, seed: int
) -> list[list[list[int]]]:
    """Every optimizer step of `epoch`: its global batch cut into micro-batches (example indices), in the
    order `training_batches` deals them to ranks. The same on every rank, so each knows a step's whole
    batch without a collective.

    The last incomplete global batch of an epoch is dropped so that every optimizer step averages the
    same number of examples; a task with fewer examples than one global batch is an error.
    """
    steps = num_examples // global_batch
    if steps == 0:
        raise CLScaleError(
            f"the task has {num_examples} training examples, fewer than one global batch ({global_batch})",
            "lower train.global_batch or raise data.max_train_examples",
        )
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [
        [order[start : start + per_device_batch] for start in range(step * global_batch, (step + 1) * global_batch,
                                                                    per_device_batch)]
        for step in range(steps)
    ]


def rank_share(step: Sequence[T], world_size: int, rank: int) -> list[T]:
    """What `rank` runs of one step's micro-batches (or of values paired with them), in order: micro-batch
    `a * world_size + rank` is its `a`-th accumulation step."""
    return list(step[rank::world_size])


def training_batches(
    num_examples: int,
    *,
    global_batch: int,
    per_device_batch: int,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
) -> list[list[int]]:
    """The micro-batches (example indices) `rank` trains on in `epoch`, in order."""
    steps = step_micro_batches(num_examples, global_batch=global_batch, per_device_batch=per_device_batch,
                               epoch=epoch, seed=seed)
    return [micro for step in steps for micro in rank_share(step, world_size, rank)]


def even_shards(num_examples: int, *, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Batches of this rank's examples (round-robin), with the same batch count on every rank."""
    if num_examples < world_size:
        raise CLScaleError(
            f"{num_examples} examples cannot be shared by {world_size} ranks",
            "use more examples (data.max_*_examples) or fewer ranks",
        )
    mine = list(range(rank, num_examples, world_size))
    count = math.ceil(math.ceil(num_examples / world_size) / batch_size)
    count = min(count, len(range(world_size - 1, num_examples, world_size)))
    base, extra = divmod(len(mine), count)
    batches, start = [], 0
    for index in range(count):
        size = base + (1 if index < extra else 0)
        batches.append(mine[start : start + size])
        start += size
    return batches
