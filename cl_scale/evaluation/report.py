"""How a run's accuracy matrix is shown and stored: rich tables, matrix.json/csv, metrics.json, plots.

The files live at the top of the run directory (DESIGN.md) and are written atomically, so a crash during
`cl-scale eval` never leaves a half-written matrix that a later `--compare` would read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from cl_scale.atomic import write_json, write_text, write_with
from cl_scale.errors import CLScaleError
from cl_scale.evaluation.diagnostics import BranchDiagnostics
from cl_scale.evaluation.metrics import Matrix, Metrics, ap_after_each_stage, num_tasks

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MATRIX_JSON = "matrix.json"
MATRIX_CSV = "matrix.csv"
METRICS_JSON = "metrics.json"
HEATMAP_PNG = "heatmap.png"
AP_CURVE_PNG = "ap_curve.png"

MISSING = "·"


def _fmt(value: float | None) -> str:
    """A score as printed in every table: two decimals, or the missing mark."""
    return MISSING if value is None else f"{value:.2f}"


def _stage_label(k: int, task: str) -> str:
    """Row label of stage k (0-based), counted from 1 for people."""
    return f"after {k + 1}: {task}"


def _check_names(R: Matrix, task_names: Sequence[str]) -> int:
    """T, after checking there is one task name per column of R."""
    T = num_tasks(R)
    if len(task_names) != T:
        raise CLScaleError(
            f"{len(task_names)} task names for a {T}x{T} accuracy matrix",
            "pass the run's task order, one name per task",
        )
    return T


def metrics_caption(metrics: Metrics) -> str:
    """One line with the four summary numbers, as printed under the matrix."""
    return f"AP {metrics.ap:.2f} · FT {metrics.ft:.2f} · BWT {metrics.bwt:.2f} · diag {metrics.diag:.2f}"


def matrix_table(R: Matrix, task_names: Sequence[str], metrics: Metrics) -> Table:
    """The accuracy matrix as a rich table: one row per stage, one column per task, metrics as caption."""
    _check_names(R, task_names)
    table = Table(title="Accuracy matrix R (score on task after stage)", caption=metrics_caption(metrics))
    table.add_column("stage", style="bold")
    for name in task_names:
        table.add_column(name, justify="right")
    for k, row in enumerate(R):
        table.add_row(_stage_label(k, task_names[k]), *(_fmt(v) for v in row))
    return table


def _matrix_csv(R: Matrix, task_names: Sequence[str]) -> str:
    """CSV text: header `after` + task names, then per stage the task just trained and its scores."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["after", *task_names])
    for k, row in enumerate(R):
        writer.writerow([task_names[k], *("" if v is None else repr(float(v)) for v in row)])
    return buffer.getvalue()


def _save_png(path: Path, fig: Figure) -> None:
    """Render `fig` with the Agg canvas (no display, no pyplot state) and write it atomically."""
    FigureCanvasAgg(fig)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _draw_heatmap(fig: Figure, ax: Axes, R: Matrix, task_names: Sequence[str], title: str | None = None) -> None:
    """Heat map of R on a 0-100 colour scale, each evaluated cell annotated, missing cells blank."""
    T = len(task_names)
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in R])
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=100.0)
    fig.colorbar(image, ax=ax, label="score", shrink=0.8)
    for i in range(T):
        for j in range(T):
            if not np.isnan(values[i, j]):
                colour = "white" if values[i, j] < 50 else "black"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(T), task_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(T), [_stage_label(k, name) for k, name in enumerate(task_names)], fontsize=7)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training stage")
    if title:
        ax.set_title(title, fontsize=9)


def _heatmap(R: Matrix, task_names: Sequence[str]) -> Figure:
    size = 2.5 + 0.6 * len(task_names)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    _draw_heatmap(fig, fig.add_subplot(), R, task_names)
    return fig


def write_heatmaps_side_by_side(path: str | os.PathLike[str], panels: Sequence[tuple[str, Matrix, Sequence[str]]]) -> None:
    """One PNG with a heat map per (title, R, task names) panel, left to right (e.g. one per method)."""
    size = 2.5 + 0.6 * max(len(names) for _, _, names in panels)
    fig = Figure(figsize=((size + 1.5) * len(panels), size), layout="constrained")
    for k, (title, R, names) in enumerate(panels):
        _draw_heatmap(fig, fig.add_subplot(1, len(panels), k + 1), R, names, title)
    _save_png(Path(path), fig)


def _ap_curve(R: Matrix, task_names: Sequence[str]) -> Figure:
    """AP over the tasks seen so far, after every stage."""
    T = len(task_names)
    fig = Figure(figsize=(3.0 + 0.5 * T, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(1, T + 1), ap_after_each_stage(R), marker="o")
    labels = [_stage_label(k, name) for k, name in enumerate(task_names)]
    ax.set_xticks(range(1, T + 1), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0.0, 100.0)
    ax.set_ylabel("AP over tasks seen so far")
    ax.grid(alpha=0.3)
    return fig


def write_matrix_files(
    run_dir: str | os.PathLike[str], R: Matrix, task_names: Sequence[str], metrics: Metrics
) -> None:
    """Write matrix.json, matrix.csv, metrics.json, heatmap.png and ap_curve.png into `run_dir`."""
    _check_names(R, task_names)
    root = Path(run_dir)
    matrix = [[None if v is None else float(v) for v in row] for row in R]
    write_json(
        root / MATRIX_JSON, {"tasks": list(task_names), "matrix": matrix, "metrics": metrics.as_dict()}
    )
    write_text(root / MATRIX_CSV, _matrix_csv(R, task_names))
    write_json(root / METRICS_JSON, metrics.as_dict())
    _save_png(root / HEATMAP_PNG, _heatmap(R, task_names))
    _save_png(root / AP_CURVE_PNG, _ap_curve(R, task_names))


@dataclass(frozen=True)
class MatrixFile:
    """The contents of a run's matrix.json."""

    tasks: list[str]
    matrix: list[list[float | None]]
    metrics: Metrics


def _corrupt(path: Path, why: str) -> CLScaleError:
    return CLScaleError(
        f"{path} is not a cl-scale matrix file: {why}",
        f"delete it and run `cl-scale eval {path.parent}` to rebuild it",
    )


def read_matrix(run_dir: str | os.PathLike[str]) -> MatrixFile:
    """Load matrix.json of a run, checking it is one that `write_matrix_files` wrote."""
    path = Path(run_dir) / MATRIX_JSON
    if not path.is_file():
        raise CLScaleError(
            f"{path} does not exist: this run was never evaluated", f"run `cl-scale eval {run_dir}`"
        )
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict) or not {"tasks", "matrix", "metrics"} <= data.keys():
        raise _corrupt(path, "expected an object with keys tasks, matrix, metrics")
    tasks, matrix = data["tasks"], data["matrix"]
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise _corrupt(path, "tasks must be a list of task names")
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        raise _corrupt(path, "matrix must be a list of rows")
    try:
        _check_names(matrix, tasks)
        metrics = Metrics.from_dict(data["metrics"])
    except CLScaleError as err:
        raise _corrupt(path, err.problem) from err
    return MatrixFile(tasks=tasks, matrix=matrix, metrics=metrics)


def _ap_ft(run: Mapping[str, Any]) -> str:
    """The papers' cell "AP / FT" for one run dict."""
    try:
        return f"{run['metrics']['AP']:.2f} / {run['metrics']['FT']:.2f}"
    except (KeyError, TypeError, ValueError) as err:
        raise CLScaleError(
            f"run {run.get('method')!r} on order {run.get('order')!r} has no numeric AP and FT metrics",
            "evaluate it with `cl-scale eval RUN_DIR` before comparing",
        ) from err


def compare_table(runs: Sequence[Mapping[str, Any]]) -> Table:
    """Runs side by side as in the papers: methods as rows, task orders as columns, cells "AP / FT".

    Each run is a mapping with `method`, `order` and `metrics` (the metrics.json form, keys AP and FT).
    Rows and columns keep the order in which methods and orders first appear.
    """
    cells: dict[tuple[str, str], str] = {}
    for run in runs:
        key = (str(run["method"]), str(run["order"]))
        if key in cells:
            raise CLScaleError(
                f"two runs of method {key[0]!r} on order {key[1]!r}: a table cell can show only one",
                "compare one run per method and order",
            )
        cells[key] = _ap_ft(run)
    methods = list(dict.fromkeys(method for method, _ in cells))
    orders = list(dict.fromkeys(order for _, order in cells))
    table = Table(title="AP / FT (higher AP and lower FT are better)")
    table.add_column("method", style="bold")
    for order in orders:
        table.add_column(order, justify="right")
    for method in methods:
        table.add_row(method, *(cells.get((method, order), MISSING) for order in orders))
    return table


def diagnostics_table(diag: BranchDiagnostics) -> Table:
    """The N-LoRA diagnostics as a two-column table, the tolerance printed beside the collision rate."""
    table = Table(title="Branch diagnostics (N-LoRA)")
    table.add_column("diagnostic", style="bold")
    table.add_column("value", justify="right")
    table.add_row(f"parameter collision rate (|v| > {diag.collision_tol:g})", f"{diag.collision_rate:.4%}")
    table.add_row(
        "task orthogonality  sum ||A_i A_j^T||_F^2  (lower = more orthogonal)", f"{diag.orthogonality:.4g}"
    )
    return table


def gate_table(gates: Sequence[Sequence[float]], task_names: Sequence[str]) -> Table:
    """The gate matrix as a table: rows are the inputs of a task, columns the gate of a task."""
    if len(gates) != len(task_names) or any(len(row) != len(task_names) for row in gates):
        raise CLScaleError(
            f"a gate matrix of {len(gates)} rows for {len(task_names)} tasks",
            "pass one task name per task and the matrix from `gate_matrix`",
        )
    table = Table(title="Mean gate coefficient (row: inputs of task, column: gate of task)")
    table.add_column("inputs", style="bold")
    for name in task_names:
        table.add_column(name, justify="right")
    for name, row in zip(task_names, gates):
        table.add_row(name, *(f"{v:.3f}" for v in row))
    return table
