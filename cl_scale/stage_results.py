"""A run's accuracy matrix as files: each evaluated stage's scores.json and predictions, read and written.

A cell R[i][j] is stored when stage i's scores.json has task j AND its predictions/<task>.jsonl exists
(predictions are written first, the score last, so a crash between the two leaves a cell that is simply
evaluated again). The names are cl_scale.rundir's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cl_scale import atomic
from cl_scale.errors import CLScaleError
from cl_scale.rundir import PREDICTIONS, SCORES_JSON, RunDir


def predictions_path(stage_dir: Path, task: str) -> Path:
    """Where the predictions of `task` evaluated after a stage live."""
    return stage_dir / PREDICTIONS / f"{task}.jsonl"


def read_stage_scores(run: RunDir, index: int) -> dict[str, float]:
    """Scores {task: score} stored for stage `index` (empty when it was not evaluated)."""
    path = run.stage_dir(index) / SCORES_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {task: float(entry["score"]) for task, entry in data.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CLScaleError(f"{path} is corrupted ({err})", f"delete it and run `cl-scale eval {run.path}`") from err


def run_matrix(run: RunDir, stages: int) -> list[list[float | None]]:
    """R[i][j] for the first `stages` stages and tasks (None where a cell was not evaluated)."""
    tasks = run.tasks[:stages]
    matrix = []
    for i in range(stages):
        scores = read_stage_scores(run, i) if i in run.finished_stages() else {}
        matrix.append([scores.get(task) if j <= i else None for j, task in enumerate(tasks)])
    return matrix


def missing_cells(run: RunDir, stages: int) -> dict[int, list[str]]:
    """{stage index: tasks seen by then whose cell is not stored}, over the first `stages` stages."""
    missing = {}
    for index in range(stages):
        scores = read_stage_scores(run, index)
        stage_dir = run.stage_dir(index)
        tasks = [
            task for task in run.tasks[: index + 1]
            if task not in scores or not predictions_path(stage_dir, task).is_file()
        ]
        if tasks:
            missing[index] = tasks
    return missing


def _count_predictions(path: Path) -> int:
    """Number of JSON lines in a predictions file, or a clear error when one is not JSON."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            raise CLScaleError(
                f"{path} line {number} is not JSON ({err.msg})",
                f"delete {path} and run `cl-scale eval` on the run again to regenerate it",
            ) from err
    return len(lines)


def check_stored_predictions(run: RunDir, stages: int, test_sizes: dict[str, int]) -> None:
    """Fail on the first stored cell whose predictions file does not hold one line per test example."""
    for index in range(stages):
        stage_dir = run.stage_dir(index)
        for task in read_stage_scores(run, index):
            path = predictions_path(stage_dir, task)
            if task not in test_sizes or not path.is_file():
                continue
            count = _count_predictions(path)
            if count != test_sizes[task]:
                raise CLScaleError(
                    f"{path} holds {count} predictions but task {task} has {test_sizes[task]} test examples",
                    f"delete {path} and run `cl-scale eval {run.path}` again to regenerate it",
                )


def write_stage_results(stage_dir: Path, results: dict[str, Any]) -> None:
    """Save TaskResults into a stage folder: predictions first, then the merged scores.json, each atomically."""
    if not results:
        return
    for task, result in results.items():
        atomic.write_jsonl(predictions_path(stage_dir, task), result.rows)
    path = stage_dir / SCORES_JSON
    scores = json.loads(path.read_text()) if path.is_file() else {}
    for task, result in results.items():
        scores[task] = {"metric": result.metric, "score": result.score, "examples": len(result.rows)}
    atomic.write_json(path, scores)
