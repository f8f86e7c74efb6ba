"""What a run records about its training besides the snapshots: step records and memory.

The per-step JSONL log written with each stage is the record of truth; DeepSpeed's monitors
(cl_scale.tracking) are optional live views of the same numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from cl_scale import atomic
from cl_scale import distributed as dist_utils

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def step_record(engine: DeepSpeedEngine, sums: dict[str, torch.Tensor], accumulation: int, tokens: torch.Tensor,
                started: float, epoch: int, step: int, *, stop_requested: bool = False) -> tuple[dict[str, Any], bool]:
    """One optimizer step's log line (every loss term averaged over all ranks' micro-batches), and whether
    any rank was asked to stop.

    `sums` and `tokens` are float64 tensors on the rank's device; this rank's stop request rides in the
    same all-reduce, so the step keeps one collective and one host sync, and every rank learns of a stop
    after the same step. Collective, so every rank calls it at every step.
    """
    names = sorted(sums)
    stop = torch.ones_like(tokens) if stop_requested else torch.zeros_like(tokens)
    values = torch.stack([sums[n] for n in names] + [tokens, stop]).double()
    dist_utils.all_reduce_sum(values)
    values = values.cpu()
    micro_batches = accumulation * dist_utils.world_size()
    terms = {n: values[i].item() / micro_batches for i, n in enumerate(names)}
    grad_norm = engine.get_global_grad_norm()
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {
        "step": step,
        "epoch": epoch,
        "loss": sum(terms.values()),
        **{f"loss_{n}": v for n, v in terms.items()},
        "lr": engine.get_lr()[0],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": values[-2].item() / elapsed,
    }, values[-1].item() > 0


class LiveStepLog:
    """Rank 0's step records of the stage in training: one JSON line appended and flushed per step, so a
    crash keeps every finished step. Each attempt at a stage starts the file afresh from `kept` (the records
    an earlier attempt made and this one continues from), so records are never duplicated."""

    def __init__(self, path: Path, kept: list[dict[str, Any]]) -> None:
        atomic.write_jsonl(path, kept)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held for the stage, closed in close)

    def append(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resident_memory_mb() -> float | None:
    """This process's resident set size in MiB (Linux /proc), None where the kernel does not tell."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None
