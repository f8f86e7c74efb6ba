"""The accuracy matrix as stored in a run directory: one scores.json per evaluated stage."""

from __future__ import annotations

import json
from typing import Any

from cl_scale.errors import CLScaleError

SCORES_JSON = "scores.json"


def read_stage_scores(run: Any, index: int) -> dict[str, float]:
    """Scores {task: score} stored for stage `index` (empty when it was not evaluated)."""
    path = run.stage_dir(index) / SCORES_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {task: float(entry["score"]) for task, entry in data.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CLScaleError(f"{path} is corrupted ({err})", f"delete it and run `cl-scale eval {run.path}`") from err


def run_matrix(run: Any, stages: int) -> list[list[float | None]]:
    """R[i][j] for the first `stages` stages and tasks (None where a cell was not evaluated)."""
    tasks = run.tasks[:stages]
    matrix = []
    for i in range(stages):
        scores = read_stage_scores(run, i) if i in run.finished_stages() else {}
        matrix.append([scores.get(task) if j <= i else None for j, task in enumerate(tasks)])
    return matrix
