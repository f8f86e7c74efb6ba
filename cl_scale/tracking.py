"""Experiment tracking through DeepSpeed's monitors (TensorBoard, Weights & Biases, CSV, Comet).

The sections are the DeepSpeed config's own (`tensorboard`, `wandb`, `csv_monitor`, `comet`, set in the
JSON file or `deepspeed.overrides`); `train.tensorboard: true` is a shorthand for the TensorBoard one.
One monitor is opened per run on rank 0, so every stage writes on one global optimizer-step axis: each
step's loss terms, lr, grad norm and tokens/s, and at the end of a stage its scores and AP. The engines
of the stages get the config without these sections, so they open no writers (or W&B runs) of their own.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cl_scale import distributed as dist_utils
from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from cl_scale.recipe import Recipe

MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")
TENSORBOARD_DIR = "tensorboard"
# Where a file-writing monitor goes inside the run directory when its section names no output_path.
_DEFAULT_JOB = {"tensorboard": TENSORBOARD_DIR, "csv_monitor": "csv_monitor"}


def monitor_sections(recipe: Recipe, ds_config: dict[str, Any], run_path: Path) -> dict[str, dict[str, Any]]:
    """The enabled monitor sections, file outputs placed in the run directory unless the config says where."""
    sections = {name: copy.deepcopy(ds_config.get(name) or {}) for name in MONITORS}
    if recipe.train.tensorboard:
        sections["tensorboard"]["enabled"] = True
    for name, job in _DEFAULT_JOB.items():
        section = sections[name]
        if section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(run_path)
            section.setdefault("job_name", job)
    return {name: section for name, section in sections.items() if section.get("enabled")}


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}
"""The package each monitor needs (the CSV monitor needs none)."""


def require_monitor_packages(recipe: Recipe, ds_config: dict[str, Any]) -> None:
    """Fail before any work when an enabled monitor's package is missing.

    Checked on every rank (same environment everywhere): only rank 0 opens the monitor, so a missing
    package found there alone would leave the other ranks waiting in their next collective.
    """
    for name in monitor_sections(recipe, ds_config, Path(".")):
        package = _PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            shorthand = name == "tensorboard" and recipe.train.tensorboard
            switch = "train.tensorboard=false" if shorthand else f"the {name} section's enabled"
            raise CLScaleError(
                f"the {name} monitor is enabled but the {package} package is not installed",
                f"pip install {package}, or turn it off ({switch})",
            )


def engine_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config for the stages' engines: without the monitor sections the run's Tracker owns."""
    return {key: value for key, value in ds_config.items() if key not in MONITORS}


class Tracker:
    """Rank 0's DeepSpeed MonitorMaster for the whole run."""

    def __init__(self, sections: dict[str, dict[str, Any]]) -> None:
        from deepspeed.monitor.config import get_monitor_config
        from deepspeed.monitor.monitor import MonitorMaster

        self.monitor = MonitorMaster(get_monitor_config(sections))

    def log_step(self, record: dict[str, Any], global_step: int) -> None:
        """Every number of a step record (loss terms, lr, grad norm, tokens/s) at the run's global step."""
        events = [(f"train/{key}", value, global_step) for key, value in record.items()
                  if key not in ("step", "epoch") and isinstance(value, int | float)]
        self.monitor.write_events(events)

    def log_scores(self, scores: dict[str, float], global_step: int) -> None:
        """A stage's scores (the tasks seen so far) and their mean, AP, at the stage's last global step."""
        events = [(f"eval/{task}", score, global_step) for task, score in scores.items()]
        if scores:
            events.append(("eval/AP", sum(scores.values()) / len(scores), global_step))
        self.monitor.write_events(events)

    def close(self) -> None:
        if self.monitor.tb_monitor is not None:
            self.monitor.tb_monitor.summary_writer.close()
        if self.monitor.wandb_monitor is not None:
            import wandb

            wandb.finish()


def open_tracker(recipe: Recipe, ds_config: dict[str, Any], run_path: Path) -> Tracker | None:
    """The run's tracker on rank 0 when any monitor is enabled; None elsewhere."""
    sections = monitor_sections(recipe, ds_config, run_path)
    if not sections or not dist_utils.is_main():
        return None
    return Tracker(sections)
