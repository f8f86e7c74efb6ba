"""`cl-scale eval` and `cl-scale eval --compare` on a finished (or partly finished) run.

Every rank runs the same code (generation and gate forwards are collective under ZeRO-3); only rank 0
prints and writes. Stage results are written only from full test sets: with `max_examples` the newly
evaluated cells and the matrix built with them go to `<run>/quick-look/`, never into `stages/` or the
run's own matrix files, so a quick look can never replace a good result with a partial one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cl_scale import distributed as dist_utils
from cl_scale.cache import cache_root
from cl_scale.continual_state import load_stage_model, open_run_recipe
from cl_scale.data.pipeline import prepare_task
from cl_scale.data.tasks import load_task
from cl_scale.errors import CLScaleError
from cl_scale.evaluation.diagnostics import gate_matrix
from cl_scale.evaluation.gates import gate_coefficients
from cl_scale.evaluation.generation import evaluate_task
from cl_scale.evaluation.metrics import Metrics, compute_metrics
from cl_scale.evaluation.report import (
    compare_table,
    diagnostics_table,
    gate_table,
    matrix_table,
    metrics_caption,
    write_matrix_files,
)
from cl_scale.evaluation.run_diagnostics import (
    branch_diagnostics_from_dict,
    read_diagnostics,
    run_branch_diagnostics,
    write_diagnostics,
)
from cl_scale.methods import method_class
from cl_scale.recipe import MethodConfig
from cl_scale.rundir import SNAPSHOT
from cl_scale.stage_results import check_stored_predictions, missing_cells, run_matrix, write_stage_results

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from cl_scale.continual_state import StageModel
    from cl_scale.evaluation.generation import TaskResult
    from cl_scale.recipe import Recipe
    from cl_scale.rundir import RunDir

QUICK_LOOK = "quick-look"
"""Folder of a run that receives `--max-examples` results."""

@dataclass
class RunReport:
    """What evaluating one run gave: its matrix over the finished stages, metrics and diagnostics."""

    path: Path
    label: str
    order: str
    tasks: list[str]
    matrix: list[list[float | None]]
    metrics: Metrics
    diagnostics: dict[str, Any]
    written_to: Path


def method_label(method_cfg: MethodConfig) -> str:
    """The method as papers name it; GainLoRA names its branch method too, e.g. "GainLoRA (InfLoRA)"."""
    return method_class(method_cfg.name).label(method_cfg)


def order_label(run: RunDir) -> str:
    """The run's named task order, or its tasks in order when the recipe listed them."""
    return run.manifest.get("order") or " → ".join(run.tasks)


def _console() -> Console:
    from rich.console import Console

    return Console(quiet=not dist_utils.is_main())


def _cache_dir() -> Path:
    return cache_root() / "tokenized"


def _plan(run: RunDir, recipe: Recipe, stages: int) -> dict[int, list[str]]:
    """Check the stored predictions against the test sets, then list the cells to evaluate."""
    seed = recipe.train.seed
    sizes = {task: len(load_task(recipe.data, task, "test", seed=seed)) for task in run.tasks[:stages]}
    check_stored_predictions(run, stages, sizes)
    return missing_cells(run, stages)


def _gate_matrix(stage: StageModel, recipe: Recipe, tasks: list[str]) -> list[list[float]]:
    """Mean coefficient of each gate on each task's whole test set (cheap: no generation)."""
    coefs = {}
    for index, task in enumerate(tasks):
        rows = prepare_task(
            recipe.data, recipe.train.seed, stage.tokenizer, stage.kind, task, "test", prompts_only=True,
            cache_dir=_cache_dir(),
        )
        coefs[index] = gate_coefficients(stage.engine, rows, batch_size=recipe.eval.batch_size)
    return gate_matrix(coefs)


def _evaluate_stage(
    run: RunDir, recipe: Recipe, index: int, tasks: list[str], *, max_examples: int | None, with_gates: bool,
    progress: Callable[[str], None],
) -> tuple[dict[str, TaskResult], list[list[float]] | None]:
    """TaskResults of `tasks` after stage `index`, and the gate matrix if asked; the model is freed on return."""
    results = {}
    with load_stage_model(recipe, run, index) as stage:
        for task in tasks:
            results[task] = evaluate_task(
                stage.engine, recipe, stage.tokenizer, stage.kind, task,
                cache_dir=_cache_dir(), max_examples=max_examples,
            )
            progress(f"after stage {index + 1}, {task}: {results[task].metric} {results[task].score:.2f}")
        gates = _gate_matrix(stage, recipe, run.tasks[: index + 1]) if with_gates else None
    return results, gates


def _diagnostics(run: RunDir, recipe: Recipe, stages: int, gates: list[list[float]] | None) -> dict[str, Any]:
    """diagnostics.json: branch numbers of the last finished stage (None with one branch) and the gate matrix."""
    branches = run_branch_diagnostics(run.stage_dir(stages - 1) / SNAPSHOT, recipe.method)
    return {
        "stages": stages,
        "tasks": run.tasks[:stages],
        "branches": None if branches is None else branches.as_dict(),
        "gates": gates,
    }


def _finish(
    run: RunDir, recipe: Recipe, stages: int, out: Path, filled: dict[tuple[int, str], float],
    stored: dict[str, Any] | None, gates: list[list[float]] | None,
) -> RunReport:
    """Rank 0: the matrix with the new cells, its metrics and files, and the diagnostics."""
    tasks = run.tasks[:stages]
    matrix = run_matrix(run, stages)
    for (index, task), score in filled.items():
        matrix[index][tasks.index(task)] = score
    metrics = compute_metrics(matrix)
    write_matrix_files(out, matrix, tasks, metrics)
    diagnostics = stored
    if diagnostics is None:
        diagnostics = _diagnostics(run, recipe, stages, gates)
        write_diagnostics(run.path, diagnostics)
    return RunReport(run.path, method_label(recipe.method), order_label(run), tasks, matrix, metrics, diagnostics, out)


def _progress_bar(console: Console, total: int) -> Progress:
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    return Progress(
        TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not dist_utils.is_main() or total == 0,
    )


def _evaluate(run: RunDir, recipe: Recipe, max_examples: int | None, console: Console) -> RunReport:
    """Fill the missing cells of one run (collective) and return its report (the same on every rank)."""
    stages = run.finished_prefix()
    if stages == 0:
        raise CLScaleError(
            f"{run.path} has no finished stage to evaluate",
            f"finish at least one stage: cl-scale train {run.path / 'recipe.yaml'} --run-dir {run.path} --resume",
        )
    missing = dist_utils.run_on_main(_plan, run, recipe, stages)
    out = run.path if max_examples is None else run.path / QUICK_LOOK
    if max_examples is not None:
        dist_utils.run_on_main(shutil.rmtree, out, ignore_errors=True)
    stored = dist_utils.run_on_main(read_diagnostics, run.path, stages)
    need_gates = method_class(recipe.method.name).gated and stored is None
    loads = sorted(set(missing) | ({stages - 1} if need_gates else set()))
    filled: dict[tuple[int, str], float] = {}
    gates = None
    total = sum(map(len, missing.values()))
    with _progress_bar(console, total) as progress:
        bar = progress.add_task("evaluate", total=total)

        def advance(line: str) -> None:
            progress.advance(bar)
            console.print(line)

        for index in loads:
            results, stage_gates = _evaluate_stage(
                run, recipe, index, missing.get(index, []), max_examples=max_examples,
                with_gates=need_gates and index == stages - 1, progress=advance,
            )
            if stage_gates is not None:
                gates = stage_gates
            stage_out = out / run.stage_dir(index).relative_to(run.path)
            dist_utils.run_on_main(write_stage_results, stage_out, results)
            filled.update({(index, task): result.score for task, result in results.items()})
    return dist_utils.run_on_main(_finish, run, recipe, stages, out, filled, stored, gates)


def _print_report(console: Console, report: RunReport, max_examples: int | None) -> None:
    console.print(matrix_table(report.matrix, report.tasks, report.metrics))
    branches, gates = report.diagnostics.get("branches"), report.diagnostics.get("gates")
    if branches is None:
        console.print("branch diagnostics: none, the run has a single LoRA branch (SeqLoRA, or one finished stage)")
    else:
        console.print(diagnostics_table(branch_diagnostics_from_dict(branches)))
    if gates is not None:
        console.print(gate_table(gates, report.tasks))
    if max_examples is not None:
        console.print(
            f"quick look: cells evaluated now used at most {max_examples} test examples per task; "
            "stage results and the run's matrix files are unchanged"
        )
    console.print(f"matrix files: {report.written_to}")


def evaluate_run(run_dir: Path, *, max_examples: int | None = None) -> RunReport:
    """Fill every missing cell of a run's matrix, print the matrix, metrics and diagnostics, write the files."""
    run, recipe = open_run_recipe(run_dir)
    with dist_utils.process_group(recipe.train.collective_timeout_s):
        console = _console()
        report = _evaluate(run, recipe, max_examples, console)
        _print_report(console, report, max_examples)
    return report


def compare_runs(run_dirs: Sequence[Path], *, max_examples: int | None = None) -> list[RunReport]:
    """Evaluate each run as needed, then print them side by side: methods as rows, task orders as columns."""
    opened = [open_run_recipe(path) for path in run_dirs]
    with dist_utils.process_group(opened[0][1].train.collective_timeout_s):
        console = _console()
        reports = [_evaluate(run, recipe, max_examples, console) for run, recipe in opened]
        for report in reports:
            console.print(f"{report.label} on {report.order}: {metrics_caption(report.metrics)}  ({report.path})")
        console.print(
            compare_table([{"method": r.label, "order": r.order, "metrics": r.metrics.as_dict()} for r in reports])
        )
    return reports
