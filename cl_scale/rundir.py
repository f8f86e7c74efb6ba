"""The run directory: resolved recipe, manifest, one folder per finished stage.

    <run>/recipe.yaml                 the resolved recipe, written once
    <run>/manifest.json               format tag, order, world size, global batch, seed, versions, stages,
                                      sessions (each launch: versions, accelerator and backend, recipe changes;
                                      a resume: resumed_from, the stage index, task and step it went on from)
    <run>/stages/<k>-<task>/          snapshot.safetensors (branches + gates, working copies),
                                      method.safetensors (bases), train_log.jsonl,
                                      predictions/<task>.jsonl, scores.json
    <run>/in_progress/<k>-<task>/     the stage being trained: train_log.jsonl, its steps so far, appended
                                      and flushed per step (survives a crash), and checkpoint/<tag>/ (engine
                                      checkpoints inside the task, cl_scale.checkpoint); removed when it commits
    <run>/matrix.*, metrics.json, heatmap.png, ap_curve.png, diagnostics.json   (cl_scale.evaluation)

A stage is assembled in `stages/.partial-<k>-<task>/` and renamed into place, then recorded in the
manifest; every file is written atomically. So a crash leaves either a finished stage or nothing
that resume would trust, and resume restarts at the first stage the manifest does not list.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_scale import atomic
from cl_scale.errors import CLScaleError, read_format_json

FORMAT = "cl-scale-run/1"
RECIPE_YAML = "recipe.yaml"
MANIFEST_JSON = "manifest.json"
STAGES = "stages"
PARTIAL_PREFIX = ".partial-"
"""A stage folder being assembled: `stages/.partial-<k>-<task>/`."""
SNAPSHOT = "snapshot.safetensors"
"""Branch and gate values of a stage, under the names `branch_tensor_name` gives and `gates.<name>`."""
METHOD_STATE = "method.safetensors"
SCORES_JSON = "scores.json"
PREDICTIONS = "predictions"
TRAIN_LOG = "train_log.jsonl"
"""Per-step records of a stage: in its stage folder once committed, in its in_progress folder before."""
IN_PROGRESS = "in_progress"


_BRANCH_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])_(?P<index>\d+)$")


def branch_tensor_name(module: str, part: str, index: int) -> str:
    """Snapshot name of branch `index`'s `part` ("A" or "B") on target layer `module`."""
    return f"{module}.lora_{part}_{index}"


def parse_branch_tensor_name(name: str) -> tuple[str, str, int] | None:
    """(module, part, index) of a snapshot name `branch_tensor_name` gave; None for any other tensor."""
    match = _BRANCH_TENSOR.match(name)
    return None if match is None else (match["module"], match["part"], int(match["index"]))


def stage_name(index: int, task: str) -> str:
    """Folder name of stage `index` (0-based) for `task`, e.g. `01-task002_quoref`."""
    return f"{index + 1:02d}-{task}"


@dataclass
class RunDir:
    """A run directory whose manifest has been read (or created)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def finished_stages(self) -> list[int]:
        """0-based indices of stages whose snapshot is complete."""
        return [entry["index"] for entry in self.manifest["stages"]]

    def finished_prefix(self) -> int:
        """Number of stages finished in order from the first (the stages a matrix can cover)."""
        finished = set(self.finished_stages())
        count = 0
        while count in finished:
            count += 1
        return count

    def stage_dir(self, index: int) -> Path:
        return self.path / STAGES / stage_name(index, self.tasks[index])

    def in_progress_dir(self, index: int) -> Path:
        """Where stage `index` keeps what it writes while it trains (the live step log)."""
        return self.path / IN_PROGRESS / stage_name(index, self.tasks[index])

    def recipe_dict(self) -> dict[str, Any]:
        """The resolved recipe stored in the run."""
        import yaml

        return yaml.safe_load((self.path / RECIPE_YAML).read_text())

    def commit_stage(self, index: int, write: Any, record: dict[str, Any]) -> Path:
        """Build stage `index` with `write(partial_dir)`, move it into place, record it in the manifest."""
        final = self.stage_dir(index)
        partial = final.parent / f"{PARTIAL_PREFIX}{final.name}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            write(partial)
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self.manifest["stages"] = [s for s in self.manifest["stages"] if s["index"] != index]
        self.manifest["stages"].append({"index": index, "task": self.tasks[index], **record})
        self.manifest["stages"].sort(key=lambda s: s["index"])
        self.save_manifest()
        return final

    def save_manifest(self) -> None:
        atomic.write_json(self.path / MANIFEST_JSON, self.manifest)

    def discard_unfinished(self) -> None:
        """Remove partial stage folders and stage folders the manifest does not list."""
        stages = self.path / STAGES
        if not stages.is_dir():
            return
        finished = {stage_name(i, self.tasks[i]) for i in self.finished_stages()}
        for entry in stages.iterdir():
            if entry.is_dir() and entry.name not in finished:
                shutil.rmtree(entry)


def open_run(path: Path) -> RunDir:
    """Open an existing run directory, or explain why it is not one."""
    if not path.is_dir():
        raise CLScaleError(f"run directory {path} does not exist", "check the path (runs are under output.dir)")
    fix = "point to a folder made by `cl-scale train`"
    manifest = read_format_json(
        path / MANIFEST_JSON, FORMAT,
        missing=CLScaleError(f"{path} is not a cl-scale run directory (no manifest.json)", fix),
        fix="the manifest is corrupted: restore it from a backup or start a new run",
        other=lambda found: CLScaleError(
            f"{path} is not a cl-scale run directory (manifest format is {found!r}, expected {FORMAT!r})", fix
        ),
    )
    if not (path / RECIPE_YAML).is_file():
        raise CLScaleError(f"{path} has a manifest but no recipe.yaml", "the run directory is damaged; start a new run")
    return RunDir(path, manifest)


def create_run(path: Path, recipe_yaml: str, manifest: dict[str, Any]) -> RunDir:
    """Create a fresh run directory; refuses to touch a non-empty folder."""
    if path.exists() and any(path.iterdir()):
        if (path / MANIFEST_JSON).is_file():
            raise CLScaleError(
                f"run directory {path} already exists",
                "add --resume to continue it, or choose another name (--set name=...) or --run-dir",
            )
        raise CLScaleError(
            f"{path} exists, is not empty and is not a cl-scale run directory",
            "choose another name (--set name=...) or --run-dir",
        )
    path.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path / RECIPE_YAML, recipe_yaml)
    run = RunDir(path, {"format": FORMAT, **manifest, "stages": []})
    run.save_manifest()
    return run
