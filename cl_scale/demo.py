"""`cl-scale demo`: the built-in CPU demo of forgetting, and of GainLoRA preventing it.

Trains the small built-in model on the synthetic task suite once per method, through the same ZeRO-3
code path the cluster uses (world size 1), then prints AP / FT / BWT side by side and writes the heat
maps next to each other. A finished method run is reused and an interrupted one resumed, so running
the demo again is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cl_scale import distributed
from cl_scale.errors import CLScaleError
from cl_scale.evaluation.metrics import compute_metrics
from cl_scale.evaluation.report import read_matrix, write_heatmaps_side_by_side
from cl_scale.methods import method_class
from cl_scale.recipe import load_recipe
from cl_scale.rundir import MANIFEST_JSON, open_run
from cl_scale.shipped import shipped_file
from cl_scale.trainer import run_training

DEMO_RECIPE = shipped_file("recipes/demo.yaml") or Path("recipes/demo.yaml")
"""The shipped demo recipe (the relative path only when cl-scale ships none, which run_demo reports)."""
DEFAULT_METHODS = ("seqlora", "gainlora")


def _run_method(recipe_path: Path, method: str, out_dir: Path, console: Console) -> tuple[str, Path]:
    """Train (or reuse / resume) the demo run of one method; returns its label and run directory."""
    recipe = load_recipe(recipe_path, [f"method.name={method}", f"name=demo-{method}", f"output.dir={out_dir}"])
    run_dir = out_dir / recipe.name
    label = method_class(method).label(recipe.method)
    resume = (run_dir / MANIFEST_JSON).is_file()
    if resume and len(open_run(run_dir).finished_stages()) == len(open_run(run_dir).tasks):
        console.print(f"[green]reusing[/] the finished {label} run in {run_dir}")
        return label, run_dir
    console.rule(f"[bold]{label}")
    run_training(recipe, resume=resume, run_dir=run_dir, allow_changed_recipe=False)
    return label, run_dir


def run_demo(methods: Sequence[str] = DEFAULT_METHODS, out_dir: Path = Path("runs"),
             recipe_path: Path = DEMO_RECIPE) -> None:
    """Train every method on the demo recipe and print the comparison."""
    if not recipe_path.is_file():
        raise CLScaleError(
            f"demo recipe {recipe_path} not found", "reinstall cl-scale: its package lacks the shipped recipes"
        )

    console = Console()
    # One process group for every method: DeepSpeed caches the group, so it must not be re-created.
    with distributed.process_group(timeout_s=600):
        runs = {method: _run_method(recipe_path, method, out_dir, console) for method in methods}
    table = Table(title="Continual learning on the synthetic suite (higher AP, lower FT are better)")
    for column in ("method", "AP", "FT", "BWT", "just learned (diag)", "heat map"):
        table.add_column(column, justify="left" if column in ("method", "heat map") else "right")
    panels = []
    for label, run_dir in runs.values():
        matrix = read_matrix(run_dir)
        metrics = compute_metrics(matrix.matrix)
        table.add_row(label, f"{metrics.ap:.2f}", f"{metrics.ft:.2f}", f"{metrics.bwt:.2f}", f"{metrics.diag:.2f}",
                      str(run_dir / "heatmap.png"))
        panels.append((f"{label}: AP {metrics.ap:.1f}, FT {metrics.ft:.1f}", matrix.matrix, matrix.tasks))
    console.print(table)
    combined = out_dir / "demo_heatmaps.png"
    write_heatmaps_side_by_side(combined, panels)
    console.print(f"heat maps side by side: {combined}")
