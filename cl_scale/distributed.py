"""Rank helpers and the one place that reads or writes parameters outside a module's forward.

Under ZeRO-3 a parameter outside its module's forward is an empty partition. Every such access
(designing InfLoRA's A, initialising GainLoRA keys, the update projection, snapshots) goes through a
`ParamAccess`: `LocalAccess` for plain single-process modules, `ZeroAccess` for a DeepSpeed engine,
which gathers, and writes both the fp32 master partition and the working copy so they never diverge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True when a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that prints and writes files."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks (no-op on one rank) and return it."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank."""
    if not (is_distributed() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op on one rank)."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


class ParamAccess(Protocol):
    """Full-value reads and writes of possibly partitioned parameters, identical on every rank."""

    def read(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Full fp32 values; trainable parameters come from the optimizer's fp32 master copy."""

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        """Set full values into every copy of each parameter (master and working)."""


class LocalAccess:
    """ParamAccess for ordinary, unpartitioned modules."""

    def read(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in params]

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, value in zip(params, values, strict=True):
                param.copy_(value.to(device=param.device, dtype=param.dtype))


class ZeroAccess:
    """ParamAccess for a model inside a DeepSpeed ZeRO-3 engine. Collective: call on every rank."""

    def read(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        values = []
        for param in params:
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is not None:
                values.append(master.detach().float().cpu().clone())
                continue
            with zero.GatheredParameters([param]):
                values.append(param.detach().float().cpu().clone())
        return values

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        from deepspeed import zero
        from deepspeed.utils import safe_set_full_fp32_param

        for param, value in zip(params, values, strict=True):
            if param.requires_grad and hasattr(param, "_z3_optimizer"):
                safe_set_full_fp32_param(param, value.to(torch.float32))
            with zero.GatheredParameters([param], modifier_rank=0):
                if rank() == 0:
                    with torch.no_grad():
                        param.copy_(value.to(device=param.device, dtype=param.dtype))
