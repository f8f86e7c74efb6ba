"""Checkpoints inside a task, so a preempted or requeued run continues the stage it was training.

Every `train.checkpoint_every_steps` optimizer steps and after the stage's last step (so a stop during
the data pass or evaluation repeats no step), and when the scheduler asks the job to stop (SIGUSR1 or
SIGTERM), every rank writes DeepSpeed's own engine checkpoint of the stage's engine (the
trainable partitions with their fp32 masters, the optimizer and the LR scheduler) into
`<run>/in_progress/<stage>/checkpoint/<tag>/`, plus its RNG state; then rank 0 writes `complete.json`
(the optimizer steps done, the step records so far). Only a tag with that file is ever loaded, so a
checkpoint cut short is never trusted. The data order needs no state: it is a function of the seed and
the epoch, so the steps done say where to go on. The folder goes when the stage commits.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Self

import torch

from cl_scale import atomic
from cl_scale import distributed as dist_utils
from cl_scale.errors import read_json

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from cl_scale.recipe import Recipe

CHECKPOINT_DIR = "checkpoint"
COMPLETE = "complete.json"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class Resumable:
    """A complete checkpoint: its folder, tag, the optimizer steps done and the step records so far."""

    root: Path
    tag: str
    step: int
    log: list[dict[str, Any]]


def _tag(step: int) -> str:
    return f"step-{step:07d}"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _tags(root: Path) -> list[Path]:
    """The checkpoint folders (DeepSpeed also leaves its zero_to_fp32 scripts beside them)."""
    return [entry for entry in root.iterdir() if entry.is_dir()]


def layout(recipe: Recipe) -> dict[str, int]:
    """What a checkpoint's partitions and data position depend on besides the recipe's seed: a launch with
    another world size or batch layout cannot go on from it (it restarts the stage instead)."""
    return {"world_size": dist_utils.world_size(), "global_batch": recipe.train.global_batch,
            "per_device_batch": recipe.train.per_device_batch}


def newest_complete(root: Path, expected: dict[str, int]) -> Resumable | None:
    """Rank 0: the newest complete checkpoint under `root` written with the `expected` layout, after removing
    the incomplete ones."""
    if not root.is_dir():
        return None
    best = None
    for entry in sorted(_tags(root)):
        marker = entry / COMPLETE
        if not marker.is_file():
            shutil.rmtree(entry, ignore_errors=True)
            continue
        meta = read_json(marker, fix=f"remove {entry} to restart the stage from its first step")
        if meta.get("layout") == expected:
            best = Resumable(root, entry.name, int(meta["step"]), list(meta["log"]))
    return best


def save(engine: DeepSpeedEngine, root: Path, step: int, log: list[dict[str, Any]], recipe: Recipe) -> None:
    """Write the engine checkpoint of `step` on every rank, then mark it complete and drop older ones. Collective."""
    tag = _tag(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    atomic.write_with(root / tag / _rng_file(dist_utils.rank()), lambda p: torch.save(state, p))
    dist_utils.barrier()
    if dist_utils.is_main():
        atomic.write_json(root / tag / COMPLETE, {"step": step, "layout": layout(recipe), "log": log})
        for entry in _tags(root):
            if entry.name != tag:
                shutil.rmtree(entry, ignore_errors=True)
    dist_utils.barrier()


def load(engine: DeepSpeedEngine, checkpoint: Resumable) -> None:
    """Put the engine, optimizer, scheduler and this rank's RNG where the checkpoint left them. Collective."""
    engine.load_checkpoint(
        str(checkpoint.root), tag=checkpoint.tag, load_optimizer_states=True, load_lr_scheduler_states=True,
        load_module_strict=False,
    )
    state = torch.load(checkpoint.root / checkpoint.tag / _rng_file(dist_utils.rank()), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


class StopSignal:
    """SIGUSR1/SIGTERM noted (`received`) instead of killing the rank; the trainer shares it with the other
    ranks in the step's own all-reduce (`training_log.step_record`), so every rank stops after the same step."""

    def __init__(self) -> None:
        self.received = False
        self.previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def agreed(self) -> bool:
        """Whether any rank has received a signal; every rank gets the same answer. Collective."""
        flag = torch.tensor([1.0 if self.received else 0.0], dtype=torch.float64)
        return dist_utils.all_reduce_sum(flag).item() > 0

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

