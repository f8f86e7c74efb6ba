"""Continual-learning metrics computed from the accuracy matrix R (see docs/methods.md, Metrics).

`R[i][j]` is the score on task `j`'s test set after training stage `i` (both 0-based here). A cell that was
not evaluated is None; cells above the diagonal (tasks not yet trained) normally are. Every score is a
task mean: the metrics below average tasks, never samples, so a large test set cannot outweigh a small one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cl_scale.errors import CLScaleError

Matrix = Sequence[Sequence[float | None]]

_FIX_MISSING = "run `cl-scale eval RUN_DIR` to evaluate the missing stage/task pairs"


def is_number(value: Any) -> bool:
    """True for an int or float score; bool is excluded although Python counts it as an int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def num_tasks(R: Matrix) -> int:
    """Check that R is a non-empty square matrix of scores or None and return T, its number of tasks."""
    T = len(R)
    if T == 0:
        raise CLScaleError("the accuracy matrix is empty: no stage has been evaluated", _FIX_MISSING)
    for i, row in enumerate(R):
        if len(row) != T:
            raise CLScaleError(
                f"the accuracy matrix is not square: row {i} (after stage {i + 1}) has {len(row)} "
                f"cells, expected one per task ({T})",
                "rebuild the matrix with `cl-scale eval RUN_DIR`",
            )
        for j, value in enumerate(row):
            if value is not None and not is_number(value):
                raise CLScaleError(
                    f"R[{i}][{j}] is {value!r}; a cell must be a score or None (not evaluated)",
                    "rebuild the matrix with `cl-scale eval RUN_DIR`",
                )
    return T


def cell(R: Matrix, i: int, j: int) -> float:
    """R[i][j] as a float; a missing cell is an error that names it, since no formula may skip it."""
    value = R[i][j]
    if value is None:
        raise CLScaleError(
            f"the score of task {j + 1} after stage {i + 1} (R[{i}][{j}], 0-based) is missing", _FIX_MISSING
        )
    return float(value)


def average_performance(R: Matrix) -> float:
    """AP: mean score over all tasks after the last stage."""
    T = num_tasks(R)
    return sum(cell(R, T - 1, j) for j in range(T)) / T


def forgetting(R: Matrix) -> float:
    """FT (GainLoRA's forgetting): mean over earlier tasks of best-before-last minus final score.

    For task j the best is taken over stages j..T-2, i.e. from the stage that learned it up to the one
    before the last. With T = 1 there is no earlier task, so FT is 0.0.
    """
    T = num_tasks(R)
    if T == 1:
        return 0.0
    drops = (max(cell(R, i, j) for i in range(j, T - 1)) - cell(R, T - 1, j) for j in range(T - 1))
    return sum(drops) / (T - 1)


def backward_transfer(R: Matrix) -> float:
    """BWT (Lopez-Paz & Ranzato): mean over earlier tasks of final score minus just-learned score.

    Divided by T - 1, the number of earlier tasks (the reference script's division by T is not offered).
    With T = 1 there is no earlier task, so BWT is 0.0.
    """
    T = num_tasks(R)
    if T == 1:
        return 0.0
    return sum(cell(R, T - 1, j) - cell(R, j, j) for j in range(T - 1)) / (T - 1)


def diagonal_mean(R: Matrix) -> float:
    """Mean of R[i][i]: how well each task is performed right after it was learned."""
    T = num_tasks(R)
    return sum(cell(R, i, i) for i in range(T)) / T


def ap_after_each_stage(R: Matrix) -> list[float]:
    """AP over the tasks seen so far after every stage (the AP curve); the last entry equals AP."""
    T = num_tasks(R)
    return [sum(cell(R, k, j) for j in range(k + 1)) / (k + 1) for k in range(T)]


@dataclass(frozen=True)
class Metrics:
    """The four summary numbers of one run, on the same 0-100 scale as the task scores."""

    ap: float
    ft: float
    bwt: float
    diag: float

    def as_dict(self) -> dict[str, float]:
        """The form written to metrics.json and matrix.json, keyed by the names the papers print."""
        return {"AP": self.ap, "FT": self.ft, "BWT": self.bwt, "diag": self.diag}

    @classmethod
    def from_dict(cls, data: Any) -> Metrics:
        """Inverse of `as_dict`; anything else is an error, since it came from a file a user may edit."""
        keys = ("AP", "FT", "BWT", "diag")
        if not isinstance(data, dict) or not all(is_number(data.get(k)) for k in keys):
            raise CLScaleError(
                f"metrics must be an object with numbers {', '.join(keys)}, got {data!r}",
                "recompute them with `cl-scale eval RUN_DIR`",
            )
        return cls(*(float(data[k]) for k in keys))


def compute_metrics(R: Matrix) -> Metrics:
    """AP, FT, BWT and the diagonal mean of R."""
    return Metrics(
        ap=average_performance(R), ft=forgetting(R), bwt=backward_transfer(R), diag=diagonal_mean(R)
    )
